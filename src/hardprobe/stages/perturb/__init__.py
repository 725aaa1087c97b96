"""Hard inputs made on purpose: corruptions, occlusion and blends, and where predictions break.

    from hardprobe.stages.perturb import perturb_run, corrupt
    perturb_run("runs/r56", subset=2000)        # -> runs/r56/perturb/
    corrupt(image, "fog", severity=3, seed=0)    # one CIFAR-10-C corruption of a uint8 image

The package, bottom up:

    filters.py         numpy / scipy ports of the OpenCV, ImageMagick and skimage filters
    frost_textures.py  the frost textures: the original photographs, else a procedural stand-in
    corruptions.py     the 15 CIFAR-10-C corruptions with the CIFAR-10 parameters, `corrupt`,
                       per-example random draws (`example_rng`); sources in CORRUPTION_NOTES
    probes.py          occlusion, random erasing, blends; the batched forward, the flip searches
    cifar10c.py        the released CIFAR-10-C folder (`CIFAR10C`, `read_cifar10c`)
    run_heads.py       the heads classify stored in the run (`RunHeads`)
    stage.py           `perturb_run`: RUN_DIR/perturb/ and the columns joined into the examples
                       table (its docstring describes the outputs and the definitions)
"""
from ...errors import PerturbError
from .cifar10c import CIFAR10C, read_cifar10c
from .corruptions import CORRUPTION_NOTES, CORRUPTIONS, SEVERITIES, corrupt, example_rng
from .frost_textures import frost_source
from .probes import (BLEND_WEIGHTS, ERASE_AREAS, NEVER, blend, blend_flip_weights, erase,
                     erase_flip_areas, flip_severities, lowest_flip, occlude,
                     occlusion_positions, occlusion_sensitivity, predict_images)
from .run_heads import RunHeads
from .stage import perturb_columns, perturb_run

__all__ = ["CORRUPTIONS", "SEVERITIES", "CORRUPTION_NOTES", "NEVER", "ERASE_AREAS",
           "BLEND_WEIGHTS", "PerturbError", "corrupt", "example_rng", "frost_source",
           "occlude", "occlusion_positions", "erase", "blend", "lowest_flip",
           "predict_images", "flip_severities", "occlusion_sensitivity",
           "erase_flip_areas", "blend_flip_weights", "CIFAR10C", "read_cifar10c", "RunHeads",
           "perturb_run", "perturb_columns"]
