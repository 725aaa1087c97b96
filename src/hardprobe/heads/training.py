"""The training recipe shared by the fine-tuning stage and `MLPHead`: optimizer, warm-up +
cosine schedule, the epoch loop that records each example's training dynamics from its own
training forward pass, and checkpoints that make an interrupted run resume exactly.

Determinism: the data order and every augmentation draw of epoch e come from generators
seeded with (seed, job, e), and the global torch RNG (dropout) is reseeded the same way at
the start of each epoch, so epoch e is the same whether the run got there in one go or resumed
from the checkpoint of epoch e - 1 (on the CPU, with the same number of torch threads: the
thread count changes the order of float reductions; num_workers does not change the order).

A checkpoint `epoch_NNNN.pt` (NNNN = epochs done) holds the model, optimizer and scheduler
states, the torch RNG state, the per-epoch history and the dynamics recorded so far. It is
written atomically; the last `keep` are kept.
"""
from __future__ import annotations

import contextlib
import io
import math
import time
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from ..core.io import atomic_write
from ..errors import CheckpointMismatchError, ConfigError
from ..scoring.dynamics import _epoch_record

OPTIMIZERS = ("sgd", "adamw")
PRECISIONS = ("fp32", "bf16")
CHECKPOINT_VERSION = 1

# batches(order, generator) -> iterator of (x ready for the model, positions (B,) int64 numpy)
Batches = Callable[[np.ndarray, torch.Generator], Iterator[tuple[torch.Tensor, np.ndarray]]]


def make_optimizer(params, *, name: str = "sgd", lr: float = 0.01, weight_decay: float = 5e-4,
                   momentum: float = 0.9, nesterov: bool = True) -> torch.optim.Optimizer:
    """SGD (momentum, Nesterov) or AdamW over `params`."""
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=momentum, nesterov=nesterov and momentum > 0,
                               weight_decay=weight_decay)
    if name == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    raise ConfigError(f"optimizer must be one of {OPTIMIZERS}, got {name!r}")


def warmup_cosine(optimizer, *, total_steps: int, warmup_steps: int):
    """LambdaLR: linear warm-up from lr/warmup_steps to lr over `warmup_steps` steps, then a
    cosine decay to 0 at `total_steps` (stepped once per batch)."""
    total_steps, warmup_steps = max(1, int(total_steps)), max(0, int(warmup_steps))

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        t = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, t)))
    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def epoch_seed(seed: int, job: int, epoch: int) -> int:
    return int(np.random.SeedSequence([int(seed), int(job), int(epoch)]).generate_state(1)[0])


def epoch_order(n: int, *, seed: int, job: int, epoch: int) -> np.ndarray:
    """The (deterministic) order in which epoch `epoch` visits positions 0..n-1."""
    return np.random.default_rng(epoch_seed(seed, job, epoch)).permutation(n)


def autocast(precision: str, device: torch.device):
    if precision not in PRECISIONS:
        raise ConfigError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    return (torch.autocast(device.type, dtype=torch.bfloat16) if precision == "bf16"
            else contextlib.nullcontext())


class Trainer:
    """Train `net` on N examples with labels `labels` (N,) (positions 0..N-1).

    params: the parameters to optimise (the rest stay frozen). train_mode(net): puts the net
    in training mode (default net.train(); the fine-tuning stage keeps frozen BatchNorm layers
    in eval). After fit(): history (one dict per epoch: loss, acc, lr, seconds, images_per_s),
    and record = {"prob_given", "correct", "margin"}, (N, epochs) arrays from the training
    forwards (NaN / False for an example no batch delivered, e.g. an undecodable image).
    """

    def __init__(self, net: nn.Module, params, labels, *, epochs: int, batch_size: int,
                 optimizer: str = "sgd", lr: float = 0.01, weight_decay: float = 5e-4,
                 momentum: float = 0.9, nesterov: bool = True, warmup_epochs: float = 1.0,
                 label_smoothing: float = 0.0, precision: str = "fp32", device="cpu",
                 seed: int = 0, job: int = 0, checkpoint_dir=None, key: str = "", keep: int = 2,
                 train_mode: Callable[[nn.Module], None] | None = None, progress: bool = False,
                 desc: str = "train"):
        self.net, self.epochs, self.batch_size = net, int(epochs), int(batch_size)
        self.labels = torch.as_tensor(np.asarray(labels), dtype=torch.int64)
        self.n = len(self.labels)
        self.device = torch.device(device)
        self.precision, self.seed, self.job = precision, int(seed), int(job)
        self.label_smoothing = float(label_smoothing)
        self.opt = make_optimizer([p for p in params if p.requires_grad], name=optimizer, lr=lr,
                                  weight_decay=weight_decay, momentum=momentum, nesterov=nesterov)
        steps = math.ceil(self.n / self.batch_size)
        self.sched = warmup_cosine(self.opt, total_steps=steps * self.epochs,
                                   warmup_steps=round(warmup_epochs * steps))
        self.dir = None if checkpoint_dir is None else Path(checkpoint_dir)
        self.key, self.keep = key, int(keep)
        self.train_mode = train_mode or (lambda m: m.train())
        self.progress, self.desc = progress, desc
        self.history: list[dict] = []
        self.record = {"prob_given": np.full((self.n, self.epochs), np.nan, np.float32),
                       "correct": np.zeros((self.n, self.epochs), bool),
                       "margin": np.full((self.n, self.epochs), np.nan, np.float32)}
        self.epochs_done = 0

    # ---------------------------------------------------------------- loop
    def fit(self, batches: Batches, *, resume: bool = False,
            after_epoch: Callable[[int], None] | None = None) -> "Trainer":
        if resume and self.dir is not None:
            self.load_last()
        for epoch in range(self.epochs_done, self.epochs):
            self._epoch(epoch, batches)
            self.epochs_done = epoch + 1
            if self.dir is not None:
                self.save()
            if after_epoch is not None:
                after_epoch(epoch)
        return self

    def _epoch(self, epoch: int, batches: Batches) -> None:
        t0 = time.perf_counter()
        s = epoch_seed(self.seed, self.job, epoch)
        torch.manual_seed(s)  # dropout draws: the same whether resumed or not
        gen = torch.Generator().manual_seed(s)  # augmentation draws
        order = epoch_order(self.n, seed=self.seed, job=self.job, epoch=epoch)
        self.train_mode(self.net)
        loss_sum, n_seen, n_right = 0.0, 0, 0
        bar = tqdm(total=self.n, unit="img", disable=not self.progress, leave=False,
                   desc=f"{self.desc} epoch {epoch + 1}/{self.epochs}")
        lr = self.opt.param_groups[0]["lr"]
        for x, pos in batches(order, gen):
            y = self.labels[pos].to(self.device)
            with autocast(self.precision, self.device):
                logits = self.net(x)
            logits = logits.float()
            loss = F.cross_entropy(logits, y, label_smoothing=self.label_smoothing)
            self.opt.zero_grad(set_to_none=True)
            loss.backward()
            self.opt.step()
            self.sched.step()
            rec = _epoch_record(logits.detach().cpu().double().numpy(), y.cpu().numpy())
            for name, v in rec.items():
                self.record[name][pos, epoch] = v
            loss_sum += float(loss.detach()) * len(pos)
            n_seen += len(pos)
            n_right += int(rec["correct"].sum())
            bar.update(len(pos))
        bar.close()
        secs = time.perf_counter() - t0
        self.history.append({"epoch": epoch + 1, "loss": loss_sum / max(n_seen, 1),
                             "acc": n_right / max(n_seen, 1), "lr": lr, "n": n_seen,
                             "seconds": round(secs, 3),
                             "images_per_s": round(n_seen / max(secs, 1e-9), 1)})

    # ---------------------------------------------------------------- checkpoints
    def _state(self) -> dict:
        return {"version": CHECKPOINT_VERSION, "key": self.key, "epochs_done": self.epochs_done,
                "model": self.net.state_dict(), "optimizer": self.opt.state_dict(),
                "scheduler": self.sched.state_dict(), "rng": {"torch": torch.get_rng_state()},
                "history": self.history,
                "record": {k: torch.from_numpy(v[:, :self.epochs_done].copy())
                           for k, v in self.record.items()}}

    def save(self) -> Path:
        path = self.dir / f"epoch_{self.epochs_done:04d}.pt"
        buf = io.BytesIO()
        torch.save(self._state(), buf)
        atomic_write(path, lambda f: f.write(buf.getbuffer()))
        for old in checkpoints(self.dir)[:-self.keep]:
            old.unlink(missing_ok=True)
        return path

    def load_last(self) -> bool:
        """Load the newest checkpoint that reads back; False when there is none."""
        for path in reversed(checkpoints(self.dir)):
            try:
                state = torch.load(path, map_location="cpu", weights_only=True)
            except Exception:  # noqa: BLE001 - a damaged file: fall back to the one before
                continue
            self._restore(state, path)
            return True
        return False

    def _restore(self, state: dict, path: Path) -> None:
        if state.get("version") != CHECKPOINT_VERSION or state.get("key") != self.key:
            raise CheckpointMismatchError(
                f"{path} was written by a run with other options; pass the same options to "
                f"resume it, or resume=False to start again (it is then deleted)")
        done = int(state["epochs_done"])
        if done > self.epochs:
            raise CheckpointMismatchError(f"{path} has {done} epochs, more than epochs="
                                          f"{self.epochs}; use resume=False")
        self.net.load_state_dict(state["model"])
        self.opt.load_state_dict(state["optimizer"])
        self.sched.load_state_dict(state["scheduler"])
        torch.set_rng_state(state["rng"]["torch"])
        self.history = list(state["history"])
        for k, v in state["record"].items():
            self.record[k][:, :done] = v.numpy()
        self.epochs_done = done


def checkpoints(folder) -> list[Path]:
    """The checkpoint files of a folder, oldest first."""
    folder = Path(folder)
    return sorted(folder.glob("epoch_*.pt")) if folder.is_dir() else []


def predict_logits(net: nn.Module, batches: Iterator[tuple[torch.Tensor, np.ndarray]], n: int,
                   n_out: int, *, precision: str = "fp32", device="cpu") -> np.ndarray:
    """(n, n_out) float32 logits of `net` in eval mode; rows no batch delivered stay NaN."""
    out = np.full((n, n_out), np.nan, np.float32)
    net.eval()
    with torch.inference_mode(), autocast(precision, torch.device(device)):
        for x, pos in batches:
            out[pos] = net(x).float().cpu().numpy()
    return out
