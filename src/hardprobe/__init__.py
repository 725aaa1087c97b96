"""hardprobe: probe pretrained vision models with hard examples.

    import hardprobe
    run = hardprobe.load_run("runs/r56")
    run.examples.sort_values("hardness", ascending=False).head()
"""
__version__ = "0.1.0"

from .rundir.run import Run, load_run  # noqa: E402

__all__ = ["Run", "__version__", "load_run"]
