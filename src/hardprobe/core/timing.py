"""Where a stage's time goes: the seconds of its named steps, written next to its results
(metrics.json's classify_seconds_by_step, diagnose/summary.json's seconds_by_step), so a slow
run on someone's machine says which step was slow without a profiler."""
from __future__ import annotations

import contextlib
import time


class StepTimes(dict):
    """{step: seconds} (rounded to 0.01 s); `with times("knn"): ...` adds that block's wall
    time to the step (a step timed twice sums)."""

    @contextlib.contextmanager
    def __call__(self, step: str):
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self[step] = round(self.get(step, 0.0) + time.perf_counter() - t0, 2)
