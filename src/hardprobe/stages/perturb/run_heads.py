"""The run's heads, refitted on its train features, that perturb applies to perturbed images."""
from __future__ import annotations

from typing import Callable

import numpy as np

from ...core.cache import key_digest
from ...errors import PerturbError
from ...rundir.layout import HEAD_ORDER
from .probes import _model_probs

PRIMARY_ORDER = HEAD_ORDER  # one order for every stage (rundir.layout)
TRAIN = "train"


class RunHeads:
    """The run's heads refitted on its train features, as `classify` fits them: knn (k capped
    at n_train - 1, temperature, knn_weights), linear (linear_c, seed), and the model's own
    classifier when the run used it. probs(arrays) -> {head: (N, C) probabilities}."""

    def __init__(self, run, cfg=None, device="cpu"):
        from ...heads import KNNClassifier, LinearProbe
        cfg = cfg or run.config
        self.cfg = cfg
        n_classes = len(run.class_names)
        fit_x = run.features(TRAIN)
        fit_y = run.split_examples(TRAIN)["label"].to_numpy()
        self.heads: dict[str, Callable] = {}
        if "knn" in cfg.heads:
            knn = KNNClassifier(k=min(cfg.k, len(fit_x) - 1), temperature=cfg.temperature,
                                weights=cfg.knn_weights, device=device)
            knn.fit(fit_x, fit_y, n_classes=n_classes)
            self.heads["knn"] = lambda a, m=knn: m.predict_proba(a["embedding"])
        if "linear" in cfg.heads:
            probe = LinearProbe(C=cfg.linear_c, seed=cfg.seed).fit(fit_x, fit_y,
                                                                    n_classes=n_classes)
            self.heads["linear"] = lambda a, m=probe: m.predict_proba(a["embedding"])
        self.with_logits = "model" in cfg.heads and run.logits(TRAIN) is not None
        if self.with_logits:
            self.heads["model"] = _model_probs
        if not self.heads:
            raise PerturbError(f"no head to probe: heads={cfg.heads} and the model's own "
                               "classifier does not apply; add knn or linear")
        self.names = [h for h in PRIMARY_ORDER if h in self.heads]
        self.primary = self.names[0]
        # The train labels too: --label-noise and --labels change them after extraction, and
        # heads fitted on other labels predict otherwise (issue 13, item 1).
        self.key = {"train": run.provenance["features"][TRAIN]["key"],
                    "train_labels": key_digest({"labels": fit_y.tolist()}),
                    "config": {k: getattr(cfg, k) for k in ("heads", "k", "temperature",
                                                            "knn_weights", "linear_c", "seed")},
                    "primary": self.primary}

    def probs(self, arrays: dict) -> dict[str, np.ndarray]:
        return {h: np.asarray(self.heads[h](arrays), np.float64) for h in self.names}

    def primary_probs(self, arrays: dict) -> np.ndarray:
        return np.asarray(self.heads[self.primary](arrays), np.float64)
