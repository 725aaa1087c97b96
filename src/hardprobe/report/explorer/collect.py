"""Read what the explorer shows from a run directory (it only reads; it writes nothing there
but the page): the examples of the chosen splits, the 2-D map, neighbours, Grad-CAMs, images.
"""
from __future__ import annotations

import logging
import os
import re
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pandas as pd
from tqdm import tqdm

from ...errors import ConfigError
from ...rundir.layout import primary_head, require
from ...rundir.run import Run
from .data import SpriteLayout, SpriteWriter, pack_table, tile

log = logging.getLogger(__name__)

# (pattern, direction) for the score columns: the card shows each score with its direction.
DIRECTIONS = [
    (r"^hardness$|^ft_hardness$", "higher = harder"),
    (r"^prob_true_|^ft_prob_true$", "higher = easier (probability of the given label)"),
    (r"^margin_|^ft_margin$", "higher = more confident in the given label; < 0 = wrong"),
    (r"^entropy_", "higher = more uncertain"),
    (r"^knn_disagreement$", "higher = harder (share of neighbours voting another label)"),
    (r"^label_quality$", "lower = more likely mislabelled"),
    (r"^prediction_depth$", "higher = harder (decided in a later layer)"),
    (r"^flip_severity", "lower = more fragile (lowest corruption severity that flips; 6 = never)"),
    (r"^occlusion_max_drop$", "higher = more fragile to a grey patch"),
    (r"^erase_flip_area$", "lower = more fragile (smallest erased share that flips; 1 = never)"),
    (r"^blend_flip_weight$", "lower = closer to another class"),
    (r"^ft_confidence$|^ft_correctness$|^ft_aum$", "lower = harder"),
    (r"^ft_variability$", "higher = more ambiguous"),
    (r"^ft_forgetting$", "higher = harder"),
]


def direction(column: str) -> str:
    """Which way a score column points, or '' when the explorer does not know it."""
    return next((d for p, d in DIRECTIONS if re.search(p, column)), "")


def select_rows(run: Run, splits) -> pd.DataFrame:
    """The examples of `splits` (in table order), with the classify columns required."""
    ex = run.examples
    require(ex.columns, "explore")
    have = list(dict.fromkeys(ex["split"]))
    missing = [s for s in splits if s not in have]
    if missing or not splits:
        raise ConfigError(f"split(s) {', '.join(missing) or '(none)'} not in this run; it has "
                          f"{', '.join(have)}: pass --splits with some of those")
    return ex[ex["split"].isin(list(splits))].reset_index(drop=True)


def add_map(run: Run, rows: pd.DataFrame, problems: list) -> pd.DataFrame:
    """Join the similarity stage's 2-D map (similarity/map2d.parquet: id, x, y) as _map_x/_map_y
    (NaN for examples the map does not hold)."""
    p = run.path / "similarity" / "map2d.parquet"
    if not p.exists():
        problems.append("no 2-D map: run `hardprobe similarity RUN_DIR` to draw one")
        return rows
    m = pd.read_parquet(p, columns=["id", "x", "y"]).rename(columns={"x": "_map_x",
                                                                     "y": "_map_y"})
    return rows.merge(m.drop_duplicates("id"), on="id", how="left", sort=False)


def neighbours(run: Run, rows: pd.DataFrame) -> tuple[dict, list[str]]:
    """{row: [[neighbour id, label, similarity], ...] by rank} from similarity/neighbors.parquet
    (only the queries the similarity stage chose, its hardest); and the neighbour ids."""
    p = run.path / "similarity" / "neighbors.parquet"
    if not p.exists():
        return {}, []
    nb = pd.read_parquet(p).sort_values(["query_id", "rank"], kind="stable")
    index = {i: k for k, i in enumerate(rows["id"])}
    out: dict = {}
    for q, lab, n_id, sim in zip(nb["query_id"], nb["neighbor_label"], nb["neighbor_id"],
                                 nb["similarity"]):
        if q in index:
            out.setdefault(index[q], []).append([str(n_id), int(lab), round(float(sim), 4)])
    ids = list(dict.fromkeys(n[0] for v in out.values() for n in v))
    return out, ids


def cams(run: Run, rows: pd.DataFrame) -> dict:
    """{row: {"given": b64 uint8 (H, W), "pred": ..., "h", "w", "gc", "pc"}} from
    explain/cams.npz (maps in [0, 1], quantised to 0..255; the explained examples only)."""
    import base64
    p = run.path / "explain" / "cams.npz"
    if not p.exists():
        return {}
    index = {i: k for k, i in enumerate(rows["id"])}
    out = {}
    with np.load(p, allow_pickle=False) as z:
        ids = [str(i) for i in z["ids"]]
        given, pred = z["given"], z["pred"]
        gc, pc = z["given_class"], z["pred_class"]
    for k, i in enumerate(ids):
        if i not in index:
            continue
        q = [np.clip(np.nan_to_num(np.asarray(m[k], np.float32)) * 255, 0, 255).astype(np.uint8)
             for m in (given, pred)]
        out[index[i]] = {"given": base64.b64encode(q[0].tobytes()).decode(),
                         "pred": base64.b64encode(q[1].tobytes()).decode(),
                         "h": int(q[0].shape[0]), "w": int(q[0].shape[1]),
                         "gc": int(gc[k]), "pc": int(pc[k])}
    return out


def explain_images(run: Run) -> dict:
    """{id: (H, W, 3) uint8} of the explained examples: a fallback when the dataset is gone."""
    p = run.path / "explain" / "cams.npz"
    if not p.exists():
        return {}
    with np.load(p, allow_pickle=False) as z:
        return {str(i): im for i, im in zip(z["ids"], z["images"])}


def thumbnails(run: Run, ids: list[str], layout: SpriteLayout, *, fmt: str, quality: int,
               problems: list, progress: bool = False) -> list[str]:
    """Sprite sheets (data: URLs) with one tile per id, in order. Images come from the run's
    dataset; else from explain/; else a grey tile (and a line in `problems`)."""
    writer = SpriteWriter(layout, len(ids), fmt=fmt, quality=quality)
    fallback = explain_images(run)
    try:
        run.dataset()
        dataset_ok = True
    except Exception as e:  # moved or changed images: the page still opens, with grey tiles
        dataset_ok = False
        problems.append(f"the dataset's images could not be opened ({e}); thumbnails are grey "
                        "except for the explained examples")
    def one(i):  # decode + shrink; PIL releases the GIL while it decodes, so threads help
        im = None
        if dataset_ok:
            try:
                im = run.images([i])[0].permute(1, 2, 0).numpy()
            except Exception:
                im = None
        if im is None:
            im = fallback.get(i)
        return None if im is None else tile(im, layout.size)

    grey = 0
    workers = max(1, min(8, os.cpu_count() or 1))
    with ThreadPoolExecutor(workers) as pool:
        for t in tqdm(pool.map(one, ids, chunksize=256), total=len(ids), desc="thumbnails",
                      unit="img", disable=not progress, mininterval=1):
            grey += t is None
            writer.add(tile(t, layout.size))
    if grey and dataset_ok:
        problems.append(f"{grey} image(s) could not be decoded; their tiles are grey")
    return writer.encode()


def confusion_head(rows: pd.DataFrame) -> str:
    return primary_head(rows.columns)


def pack_rows(rows: pd.DataFrame) -> dict:
    """The packed columns, minus label_name (the page has the class names)."""
    return pack_table(rows.drop(columns=[c for c in ("label_name",) if c in rows]))


def run_title(run: Run) -> str:
    prov = run.provenance
    return (f"hardprobe explorer — {prov.get('backbone', {}).get('name', '?')} on "
            f"{prov.get('dataset', {}).get('name', '?')}")


def relative_link(page: Path, target: Path) -> str:
    """target as a link relative to the page's folder (for the link back to report.html)."""
    import os
    return os.path.relpath(target, page.parent).replace(os.sep, "/")
