"""The run's heads, as classify stored them (RUN_DIR/heads/), that perturb applies to perturbed
images."""
from __future__ import annotations

from typing import Callable

import numpy as np

from ...errors import PerturbError
from ...rundir.heads import heads_digest, load_heads
from ...rundir.layout import HEAD_ORDER
from .probes import _model_probs

PRIMARY_ORDER = HEAD_ORDER  # one order for every stage (rundir.layout)
TRAIN = "train"


class RunHeads:
    """The heads classify fitted and stored (knn with every option it used: k, temperature,
    knn_weights, knn_backend, knn_index, nlist, nprobe; the linear probe's weights as fitted),
    and the model's own classifier when the run used it. Nothing is refitted.
    probs(arrays) -> {head: (N, C) probabilities}.

    Like with like (issue 13, item 8): the heads were fitted on, and the clean test features
    are, the run's stored features, rounded to its feature dtype (float16 with
    --feature-dtype float16). Perturbed features come from the forward in float32, so
    `probs` rounds every input to the stored dtype first: a perturbation that changes nothing
    then changes no prediction, and no flip comes from the rounding alone."""

    def __init__(self, run, cfg=None, device="cpu"):
        cfg = cfg or run.config
        self.cfg = cfg
        stored = load_heads(run, device=device)
        self.fitted = stored  # {"knn": KNNClassifier, "linear": LinearProbe}, as classify fit
        self.heads: dict[str, Callable] = {}
        for name, head in stored.items():
            self.heads[name] = lambda a, m=head: m.predict_proba(a["embedding"])
        self.with_logits = "model" in cfg.heads and run.logits(TRAIN) is not None
        if self.with_logits:
            self.heads["model"] = _model_probs
        if not self.heads:
            raise PerturbError(f"no head to probe: heads={cfg.heads} and the model's own "
                               "classifier does not apply; add knn or linear")
        self.names = [h for h in PRIMARY_ORDER if h in self.heads]
        self.primary = self.names[0]
        # logits are stored in float32 whatever --feature-dtype says: only the embedding
        self.dtypes = {"embedding": run.features(TRAIN, mmap=True).dtype}
        # The stored heads' digest covers the classify stamp, the train features and the
        # train labels (--label-noise and --labels change them: issue 13, item 1) and every
        # head parameter, so a cached result is never another run's.
        self.key = {"heads": heads_digest(run), "primary": self.primary,
                    "with_logits": self.with_logits,
                    "dtypes": {k: str(v) for k, v in self.dtypes.items()}}

    def _like_stored(self, arrays: dict) -> dict:
        """arrays rounded to the dtypes the run stores its features in, as float32."""
        return {k: (np.asarray(v).astype(self.dtypes[k]).astype(np.float32)
                    if k in self.dtypes else v) for k, v in arrays.items()}

    def probs(self, arrays: dict) -> dict[str, np.ndarray]:
        arrays = self._like_stored(arrays)
        return {h: np.asarray(self.heads[h](arrays), np.float64) for h in self.names}

    def primary_probs(self, arrays: dict) -> np.ndarray:
        return np.asarray(self.heads[self.primary](self._like_stored(arrays)), np.float64)
