"""Is the run's train split the data the backbone's weights were trained on?

Then the features already fit those labels: kNN leave-one-out and the out-of-fold linear probe
hold out only the head, so train accuracy / ECE, label issues on train and the planted-noise
catch rate are optimistic (a planted flip still sits in its clean class's cluster). extract
records the verdict in provenance.json ("features_trained_on_train"), classify copies it next
to each affected figure of metrics.json, the report and `rank` repeat it.

Which data a split is (documented rule; only CIFAR-10 is recognised):
- `--data cifar10` (torchvision's pickle): the train split is "cifar10:train".
- `--data imagefolder`: the train split is "cifar10:train" when its class names are CIFAR-10's,
  in CIFAR-10's order, and it holds exactly 50,000 images (the whole CIFAR-10 train set, as in
  the shared JPEG copy). Any other folder is not recognised, so a CIFAR-10 subset, or ImageNet
  train under another backbone, is not flagged by itself: pass `features_trained_on_train`
  (RunConfig; CLI `--features-trained-on-train` / `--no-features-trained-on-train`) to decide.
What the weights were trained on comes from the backbone registry (`WeightsInfo.trained_on`);
a `--weights FILE` counts as the published weights only when its sha256 is theirs.
"""
from __future__ import annotations

import json
from pathlib import Path

from ...backbones.cifar_resnet import CIFAR10_CLASSES, CIFAR10_TRAIN

UPPER_BOUND = "features trained on these labels: upper bound"
CIFAR10_TRAIN_SIZE = 50_000
TRAIN = "train"


def split_identity(dataset: dict, split: str = TRAIN) -> str | None:
    """'<dataset>:<split>' of a split from `ImageSet.describe()`, or None when not recognised."""
    name = str(dataset.get("name", "")).lower()
    n = dataset.get("splits", {}).get(split, {}).get("n")
    if name == "cifar10":
        return f"cifar10:{split}"
    names = [str(c).lower().replace("_", " ").strip() for c in dataset.get("class_names", [])]
    if names == CIFAR10_CLASSES and split == TRAIN and n == CIFAR10_TRAIN_SIZE:
        return CIFAR10_TRAIN
    return None


def features_trained_on_train(weights_trained_on: str | None, dataset: dict,
                              override: bool | None = None) -> dict:
    """{"value": bool, "reason": str, "weights_trained_on", "train_split"} for provenance.json.

    value True means: the train split is (part of) what the weights were trained on, so every
    train figure computed from these features is an upper bound. `override` (not None) wins."""
    split = split_identity(dataset)
    trained = [t.strip() for t in (weights_trained_on or "").split("+") if t.strip()]
    out = {"weights_trained_on": weights_trained_on, "train_split": split}
    if override is not None:
        why = "set by features_trained_on_train in the run's config"
        return {"value": bool(override), "reason": why, **out}
    if split is not None and split in trained:
        return {"value": True, "reason": f"the weights were trained on {split}, and the run's "
                f"train split is {split}", **out}
    if weights_trained_on is None:
        why = ("the weights' training data is unknown (random init, or a --weights file that is "
               "not a registered one): not flagged")
    else:
        why = (f"the weights were trained on {weights_trained_on}; the train split is "
               f"{split or 'not a dataset hardprobe recognises'}: not flagged")
    return {"value": False, "reason": why, **out}


def run_flag(provenance: dict) -> dict | None:
    """The verdict recorded by extract, when it is True (else None)."""
    flag = provenance.get("features_trained_on_train")
    return flag if isinstance(flag, dict) and flag.get("value") else None


def rank_warning(run_dir, split: str | None) -> str | None:
    """The line `rank` prints when it ranks train examples of a flagged run, else None."""
    if split not in (None, "all", TRAIN):
        return None
    path = Path(run_dir) / "provenance.json"
    flag = run_flag(json.loads(path.read_text())) if path.exists() else None
    if flag is None:
        return None
    return (f"train scores ({UPPER_BOUND}): {flag['reason']}; hardness and label_issue of "
            "train examples are optimistic")
