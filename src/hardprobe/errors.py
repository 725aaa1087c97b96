"""Every expected failure of hardprobe, under one root.

Each message names the problem and the fix. The CLI prints a `HardprobeError` in one line and
lets anything else raise with its traceback: a bug must look like a bug. The second base of a
class (ValueError, RuntimeError, ...) keeps `except ValueError` callers working.
"""
from __future__ import annotations


class HardprobeError(Exception):
    """Root of the errors a user can fix; the message says how."""


class ConfigError(HardprobeError, ValueError):
    """A configuration key, value or flag that cannot be used as given."""


class DataError(HardprobeError, ValueError):
    """A dataset that cannot be read as asked; the message says how to fix it."""


class MixedImageSizesError(DataError):
    """Images of different sizes in one batch, and a preprocessing that does not bring them
    to one size (collate_skipping on the workers, Preprocess.geometric_batch on the device).
    Built by `of`; the constructor keeps Exception's (message), since a DataLoader worker's
    error is re-raised in the main process as exc_type(message)."""

    @classmethod
    def of(cls, shapes) -> MixedImageSizesError:
        return cls(f"images of different sizes {sorted(set(shapes))[:3]} cannot be batched: "
                   f"this model's preprocessing does not resize and crop them to one size; "
                   f"pass --image-size N")


class RunDirError(HardprobeError, FileNotFoundError):
    """A run directory that lacks what a stage needs (run the stage it names first)."""


class StageOrderError(HardprobeError, ValueError):
    """A stage needs another stage's output that the run does not hold yet."""


class CacheCorruptError(HardprobeError, RuntimeError):
    """A cached array fails its checksum; delete it and rerun."""


class NonFiniteFeaturesError(HardprobeError, ValueError):
    """The backbone produced NaN or Inf features."""


class HeadError(HardprobeError, ValueError):
    """Features or labels a head cannot be fitted on or asked about."""


class ZeroFeatureRowsError(HeadError):
    """All-zero feature rows, which have no direction for cosine kNN to rank."""


class CamError(HardprobeError, ValueError):
    """A CAM that cannot be computed faithfully (instead of a blank or wrong picture)."""


class PerturbError(HardprobeError, ValueError):
    """A perturbation that cannot run as asked; the message says how to fix it."""


class CheckpointMismatchError(HardprobeError, ValueError):
    """A checkpoint written with other options than the resumed run's."""


class WeightsUnavailableError(HardprobeError, RuntimeError):
    """The weights are neither on disk nor downloadable; the message says how to fix it."""


class WeightsError(HardprobeError, RuntimeError):
    """A weights file exists but cannot be used (corrupt, untrusted, wrong model, bad hash)."""


class UntrustedWeightsError(WeightsError):
    """The file needs full unpickling, which runs arbitrary code; refused unless trusted."""


class WeightsMismatchError(WeightsError):
    """The file's tensors do not fit the model (missing/unexpected keys, wrong shapes)."""


class UnknownModelError(HardprobeError, KeyError):
    """A backbone name that no registry entry has."""

    def __str__(self) -> str:  # KeyError quotes its message; we want plain text
        return str(self.args[0])


class CamWarning(UserWarning):
    """Some maps are blank (all zero): no positive, spatially varying evidence at that layer."""


class DeviceError(HardprobeError, RuntimeError):
    """A device, backend or torchrun setting this machine cannot honour."""


class LabelFileError(HardprobeError, ValueError):
    """A label file (--labels, --soft-labels) that does not fit the split it is meant for."""


class DiagnoseError(HardprobeError, ValueError):
    """Evidence the diagnosis cannot use as given (e.g. a --with run on other images)."""


class UnknownExampleError(HardprobeError, KeyError):
    """An example id that the run does not hold."""

    def __str__(self) -> str:  # KeyError quotes its message; we want plain text
        return str(self.args[0])
