"""The explorer: every example of a split in one offline page (`hardprobe explore RUN_DIR`).

    from hardprobe.report.explorer import write_explorer
    write_explorer("runs/r56")                       # -> runs/r56/explorer.html
    write_explorer("runs/r56", splits=("test", "train"))

The page is one self-contained file: data packed as typed arrays and sprite sheets inside it,
JavaScript and CSS inlined from the package's assets/, no request to anything outside the file
(it opens from disk and can be mailed). The explorer only reads the run directory.
"""
from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict, dataclass
from importlib import resources
from pathlib import Path

from ...config import check_config, option
from ...core.io import atomic_write_text
from ...errors import ConfigError
from ...rundir.run import load_run
from . import collect
from .data import SpriteLayout

log = logging.getLogger(__name__)
PAGE = "explorer.html"


@dataclass
class ExploreConfig:
    splits: list[str] = option(factory=lambda: ["test"],
                               help="splits to browse, from the run's (test by default; add "
                                    "train for all)")
    out: str | None = option(None, help="file to write (default RUN_DIR/explorer.html)")
    thumb: int = option(32, help="thumbnail side in px (a multiple of 16 keeps JPEG tiles "
                                 "from bleeding)")
    sheet_cols: int = option(64, help="tiles per sprite-sheet row (sheets are cols x cols)")
    image_format: str = option("jpeg", choices=("jpeg", "webp", "png"),
                               help="encoding of the sprite sheets")
    quality: int = option(80, help="JPEG / WebP quality of the sprite sheets (1-100)")


def write_explorer(run_dir, splits=("test",), out=None, *, config: ExploreConfig | None = None,
                   progress: bool = False) -> Path:
    """Write the explorer page of the run's `splits`; returns its path."""
    cfg = config or ExploreConfig(splits=list(splits), out=None if out is None else str(out))
    check_config(cfg)
    if cfg.thumb < 8 or cfg.sheet_cols < 1 or not 1 <= cfg.quality <= 100:
        raise ConfigError(f"thumb must be >= 8, sheet_cols >= 1 and quality in 1..100, got "
                          f"{cfg.thumb}, {cfg.sheet_cols}, {cfg.quality}")
    t0 = time.perf_counter()
    run = load_run(run_dir)
    path = Path(cfg.out) if cfg.out is not None else run.path / PAGE
    if path.is_dir():
        path = path / PAGE
    data = build_data(run, cfg, page=path, progress=progress)
    html = render_page(data)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, html)
    log.info("explorer: %d examples, %.1f MB, %.1f s -> %s", data["n"], len(html) / 1e6,
             time.perf_counter() - t0, path)
    return path


def explore_run(run_dir, config: ExploreConfig | None = None, **options) -> Path:
    """The `hardprobe explore` command: ExploreConfig's fields as keyword options."""
    cfg = config or ExploreConfig(**options)
    return write_explorer(run_dir, config=cfg)


def build_data(run, cfg: ExploreConfig, *, page: Path, progress: bool = False) -> dict:
    """Everything the page shows, as one JSON-able dict (columns packed)."""
    problems: list[str] = []
    rows = collect.add_map(run, collect.select_rows(run, cfg.splits), problems)
    nbrs, nb_ids = collect.neighbours(run, rows)
    row_of = {i: k for k, i in enumerate(rows["id"])}
    extra = [i for i in nb_ids if i not in row_of]  # neighbours outside the shown splits
    layout = SpriteLayout(cfg.thumb, cfg.sheet_cols, cfg.sheet_cols)
    sheets = collect.thumbnails(run, list(rows["id"]) + extra, layout, fmt=cfg.image_format,
                                quality=cfg.quality, problems=problems, progress=progress)
    thumb_of = row_of | {i: len(rows) + k for k, i in enumerate(extra)}
    neighbours = {str(r): [[thumb_of[i], *rest, i] for i, *rest in v] for r, v in nbrs.items()}
    cols = [c for c in rows.columns if not c.startswith("_")]
    report = run.path / "report.html"
    return {
        "version": 1, "title": collect.run_title(run), "run": str(run.path),
        "report": collect.relative_link(page, report),
        "classes": [str(c) for c in run.class_names], "splits": list(cfg.splits),
        "primary": collect.confusion_head(rows), "n": len(rows),
        "columns": collect.pack_rows(rows),
        "directions": {c: collect.direction(c) for c in cols if collect.direction(c)},
        "sprite": layout.to_json() | {"sheets": sheets}, "neighbors": neighbours,
        "cams": {str(k): v for k, v in collect.cams(run, rows).items()},
        "problems": problems, "config": asdict(cfg),
    }


def _asset(name: str) -> str:
    return resources.files(__package__).joinpath("assets", name).read_text(encoding="utf-8")


def render_page(data: dict) -> str:
    """The template with the CSS, the script and the data inlined. `<` is escaped in the JSON
    so that no string of the run (a class named `</script>`) can end the data block."""
    blob = json.dumps(data, separators=(",", ":"), allow_nan=False).replace("<", "\\u003c")
    html = _asset("explorer.html")
    parts = {"{{TITLE}}": _esc(data["title"]), "{{CSS}}": _asset("explorer.css"),
             "{{JS}}": _asset("explorer.js"), "{{DATA}}": blob}
    for key, value in parts.items():  # the data last: its text is never searched again
        head, sep, tail = html.partition(key)
        if not sep:
            raise AssertionError(f"placeholder {key} missing from assets/explorer.html")
        html = head + value + tail
    return html


def _esc(s: str) -> str:
    import html
    return html.escape(s, quote=True)


__all__ = ["write_explorer", "explore_run", "ExploreConfig", "build_data", "render_page"]
