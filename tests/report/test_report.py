"""The HTML report: self-contained, escaped, bounded, and it loads in a real browser."""
from __future__ import annotations

import base64
import html
import io
import json
import re
import shutil
import subprocess
import warnings
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import make_folder
from PIL import Image

import hardprobe
import hardprobe.errors
from hardprobe import pipeline
from hardprobe.config import build_config
from hardprobe.report import write_report

EVIL = "<script>alert(1)"  # a class (folder) name that must never reach the page raw
CLASSES = {"cat": (200, 40, 40), "dog": (40, 200, 40), EVIL: (40, 40, 200)}
SECTION_IDS = ["summary", "accuracy", "confusion", "reliability", "hardness", "hardest", "pairs",
               "map", "per-class", "label-issues"]
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


# ---------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def base_run(tmp_path_factory) -> Path:
    """One real tiny run (3 classes, one named like a script tag), made once per module."""
    root = tmp_path_factory.mktemp("report")
    train = make_folder(root / "train", 12, 0, classes=CLASSES)
    test = make_folder(root / "test", 4, 1, classes=CLASSES)
    cfg = build_config(model="cifar_resnet20", random_init=True, data="imagefolder",
                       train=str(train), test=str(test), out=str(root / "run"),
                       cache_dir=str(root / "cache"), k=5, num_workers=0,
                       similarity=False, top=0, report=False)  # the tests add those stages
    with warnings.catch_warnings():  # e.g. too few examples for label issues: kept in the run
        warnings.simplefilter("ignore")
        return pipeline.run(cfg, progress=False)


@pytest.fixture
def run_dir(base_run, tmp_path) -> Path:
    """A private copy of the run that a test may change."""
    return Path(shutil.copytree(base_run, tmp_path / "run"))


def add_explain(run_dir: Path) -> list[str]:
    """RUN_DIR/explain/ in the explain stage's format, for every test example."""
    run = hardprobe.load_run(run_dir)
    ex = run.split_examples("test")
    ids = ex["id"].tolist()
    images = np.stack([im.permute(1, 2, 0).numpy() for im in run.images(ids)])
    m, h, w, _ = images.shape
    yy, xx = np.mgrid[0:h, 0:w]
    def blob(cy, cx):
        return np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * (h / 6) ** 2))
    given = np.stack([blob(h / 3, w / 3) for _ in ids]).astype(np.float16)
    pred = np.stack([blob(2 * h / 3, 2 * w / 3) for _ in ids]).astype(np.float16)
    d = run_dir / "explain"
    d.mkdir()
    np.savez_compressed(d / "cams.npz", ids=np.array(ids), images=images, given=given, pred=pred,
                        given_class=ex["label"].to_numpy(), pred_class=ex["pred_linear"].to_numpy())
    rows = [{"id": i, "target": t, "class_index": int(c), "class_name": run.class_names[int(c)],
             "peak_y": 10, "peak_x": 10, "top10_mass": 0.4, "entropy": 0.8,
             "warning": "flat map" if t == "pred" else ""}
            for k, (i, lab, p) in enumerate(zip(ids, ex["label"], ex["pred_linear"]))
            for t, c in (("given", lab), ("pred", p))]
    pd.DataFrame(rows).to_parquet(d / "cam_stats.parquet", index=False)
    (d / "meta.json").write_text(json.dumps({
        "method": "gradcam", "layer": "layer3", "fast_path": True, "images_per_s": 120.0,
        "n": m, "seconds": 0.5, "throughput": {"speedup": 2.5},
        "faithfulness": {t: {"fraction": 0.2, "drop_cam": 0.3, "drop_random": 0.1,
                             "cam_beats_random": 0.9, "prob": [0.5] * m} for t in ("given", "pred")},
        "warnings": ["a test warning from explain"]}))
    return ids


def add_similarity(run_dir: Path, k: int = 3) -> None:
    """RUN_DIR/similarity/ in the similarity stage's format, from the run's own features."""
    run = hardprobe.load_run(run_dir)
    names = run.class_names
    tr, te = run.split_examples("train"), run.split_examples("test")
    def unit(x):
        return x / np.linalg.norm(x, axis=1, keepdims=True)
    ftr, fte = unit(run.features("train")), unit(run.features("test"))
    sim = fte @ ftr.T
    rows = []
    for q, qid in enumerate(te["id"]):
        for r, j in enumerate(np.argsort(-sim[q])[:k]):
            rows.append({"query_id": qid, "rank": r + 1, "neighbor_id": tr["id"][j],
                         "neighbor_label": int(tr["label"][j]),
                         "neighbor_label_name": tr["label_name"][j],
                         "similarity": float(sim[q, j])})
    d = run_dir / "similarity"
    d.mkdir()
    pd.DataFrame(rows).to_parquet(d / "neighbors.parquet", index=False)
    cent = unit(np.stack([ftr[tr["label"] == c].mean(0) for c in range(len(names))]))
    pd.DataFrame(cent @ cent.T, index=names, columns=names).to_csv(d / "centroid_similarity.csv")
    cs = cent @ cent.T
    np.fill_diagonal(cs, -np.inf)
    near = cs.argmax(1)
    pd.DataFrame({"class": names, "intra_mean": 0.9, "nearest_class": [names[j] for j in near],
                  "nearest_sim": cs.max(1), "margin": 0.9 - cs.max(1)}).to_csv(
        d / "class_separation.csv", index=False)
    ex = run.examples
    xy = np.concatenate([ftr, fte])[:, :2]
    pd.DataFrame({"id": ex["id"], "x": xy[:, 0], "y": xy[:, 1], "label": ex["label"],
                  "hardness": ex["hardness"], "label_issue": ex["label_issue"]}).to_parquet(
        d / "map2d.parquet", index=False)
    (d / "summary.json").write_text(json.dumps({"silhouette": 0.12, "map_method": "pca",
                                                "n": len(ex), "seconds": 0.3,
                                                "notes": ["a test note from similarity"]}))


def flag_issues(run_dir: Path, n: int) -> None:
    """Mark n train examples as label issues, as the classify stage would on real data."""
    p = run_dir / "examples.parquet"
    ex = pd.read_parquet(p)
    idx = ex.index[ex["split"] == "train"][:n]
    ex.loc[idx, "label_issue"] = True
    ex.loc[idx, "label_quality"] = np.linspace(0.01, 0.2, n)
    ex.to_parquet(p, index=False)


# ---------------------------------------------------------------- page checks
class Page(HTMLParser):
    """Every tag, id, and URL-carrying attribute of a page; inline style text."""

    URL_ATTRS = {"src", "href", "srcset", "action", "formaction", "poster", "data", "background",
                 "xlink:href", "manifest", "cite", "longdesc", "ping"}

    def __init__(self, text: str):
        super().__init__()
        self.ids, self.urls, self.tags, self.imgs, self.styles = set(), [], [], [], []
        self._in_style = False
        self.feed(text)

    def handle_starttag(self, tag, attrs):
        self.tags.append(tag)
        self._in_style = tag == "style"
        for k, v in attrs:
            if k == "id":
                self.ids.add(v)
            if k in self.URL_ATTRS:
                self.urls.append((tag, k, v or ""))
            if k == "style":
                self.styles.append(v or "")
        if tag == "img":
            self.imgs.append(dict(attrs).get("src", ""))

    def handle_endtag(self, tag):
        self._in_style = False

    def handle_data(self, data):
        if self._in_style:
            self.styles.append(data)


def check_self_contained(text: str) -> Page:
    page = Page(text)
    for tag, attr, url in page.urls:
        assert url.startswith(("data:", "#")) or url == "explorer.html", (tag, attr, url[:80])
    assert "script" not in page.tags and "iframe" not in page.tags
    for css in page.styles:
        assert "@import" not in css
        assert all(u.strip("'\" ").startswith("data:") for u in re.findall(r"url\(([^)]*)\)", css))
    assert not re.search(r"(src|href)\s*=\s*[\"']?\s*(https?:)?//", text, re.I)
    return page


def decoded_images(page: Page) -> list[Image.Image]:
    out = []
    for src in page.imgs:
        assert src.startswith("data:image/png;base64,"), src[:40]
        im = Image.open(io.BytesIO(base64.b64decode(src.split(",", 1)[1], validate=True)))
        im.load()
        assert im.format == "PNG" and im.width > 0 and im.height > 0
        out.append(im)
    return out


# ---------------------------------------------------------------- tests
def test_report_without_optional_stages(run_dir):
    path = write_report(run_dir)
    assert path == run_dir / "report.html"
    text = path.read_text()
    page = check_self_contained(text)
    assert set(SECTION_IDS) <= page.ids
    assert f"explain: not computed — run <code>hardprobe explain {run_dir}</code>" in text
    assert f"similarity: not computed — run <code>hardprobe similarity {run_dir}</code>" in text
    assert "Grad-CAM given" not in text and "nearest train neighbours</span>" not in text
    images = decoded_images(page)
    # confusion, reliability, hardness plots + 12 hardest test thumbnails (32x32 grown 3x)
    assert len(images) >= 3 + 12
    assert sum(im.size == (96, 96) for im in images) >= 12
    run = hardprobe.load_run(run_dir)
    for w in run.metrics.get("warnings", []):  # the run's warnings reach the summary
        assert html.escape(w) in text
    if not run.examples["label_issue"].any():
        assert "no example is a label-issue candidate" in text


def test_report_with_explain_and_similarity(run_dir):
    ids = add_explain(run_dir)
    add_similarity(run_dir, k=3)
    flag_issues(run_dir, 4)
    text = write_report(run_dir, top=6).read_text()
    page = check_self_contained(text)
    assert set(SECTION_IDS) <= page.ids
    assert "explain: not computed" not in text and "similarity: not computed" not in text
    assert "perturb: not computed" in text  # the one optional stage this test leaves out
    assert text.count('alt="Grad-CAM given') == 6 and text.count('alt="Grad-CAM pred') == 6
    assert text.count("nearest train neighbours</span>") == 6
    assert text.count('alt="neighbour ') == 6 * 3
    assert "a test warning from explain" in text and "a test note from similarity" in text
    assert "cam_beats_random" in text and "throughput.speedup" in text and "flat map" in text
    assert 'alt="2-D map of the embeddings"' in text and 'alt="centroid similarity"' in text
    assert "Class separation" in text
    assert text.count('class="badge issue"') == 0  # the flagged ones are train, not shown
    decoded_images(page)
    assert len(ids) == 12


def test_tables_truncate_with_a_note(run_dir):
    flag_issues(run_dir, 5)
    text = write_report(run_dir, top=4, max_rows=2).read_text()
    assert "showing 2 of 5 candidates" in text
    assert "showing 2 of 3 classes" in text  # per-class table
    assert "showing 4 of 12 test examples" in text
    page = check_self_contained(text)
    li = text[text.index('id="label-issues"'):].split("</section>")[0]  # that section only
    assert li.count("<tr>") == 1 + 2  # header + 2 rows
    decoded_images(page)


def test_text_is_escaped(run_dir):
    add_similarity(run_dir)
    text = write_report(run_dir).read_text()
    assert "<script" not in text.lower()
    assert "&lt;script&gt;alert(1)" in text
    page = Page(text)
    assert "script" not in page.tags


def test_report_to_another_path_and_bad_dirs(run_dir, tmp_path):
    out = write_report(run_dir, out=tmp_path / "x" / "r.html", top=2)
    assert out == tmp_path / "x" / "r.html" and out.exists()
    (tmp_path / "d").mkdir()
    assert write_report(run_dir, out=tmp_path / "d", top=2) == tmp_path / "d" / "report.html"
    # a half-written optional stage is reported, not fatal
    (run_dir / "explain").mkdir()
    (run_dir / "explain" / "cams.npz").write_bytes(b"not a zip")
    with pytest.warns(UserWarning, match="explain/ could not be read"):
        text = write_report(run_dir, top=2).read_text()
    assert "explain: not computed" in text and "could not be read" in text
    with pytest.raises(hardprobe.errors.RunDirError):
        write_report(tmp_path / "nothing")


def test_report_without_the_dataset_images(run_dir, monkeypatch):
    """Images moved away: the report still renders, from explain's images, with a warning."""
    add_explain(run_dir)
    def gone(self):
        raise hardprobe.errors.RunDirError("the images of split 'test' changed since this run")
    monkeypatch.setattr(hardprobe.Run, "dataset", gone)
    text = write_report(run_dir, top=4).read_text()
    assert "could not be opened" in text
    page = check_self_contained(text)
    decoded_images(page)
    # test thumbnails come from explain/ (no train images there: the per-class plots remain)
    assert text.count('class="missing"') == 0


def test_report_stays_bounded_at_10000_examples(run_dir, monkeypatch):
    """10,000 scored test rows (half flagged): grids and tables stay at top N / max_rows."""
    ex = pd.read_parquet(run_dir / "examples.parquet")
    rng = np.random.default_rng(0)
    n = 10_000
    big = ex[ex["split"] == "test"].sample(n, replace=True, random_state=0).reset_index(drop=True)
    big["id"] = [f"test/x/{i:05d}.png" for i in range(n)]
    big["hardness"] = rng.random(n)
    big["label_issue"] = rng.random(n) < 0.5
    big["label_quality"] = rng.random(n)
    big["pred_linear"] = rng.integers(0, 3, n)
    pd.concat([ex[ex["split"] == "train"], big]).to_parquet(run_dir / "examples.parquet")
    monkeypatch.setattr(hardprobe.Run, "dataset", lambda self: None)
    monkeypatch.setattr(hardprobe.Run, "images", lambda self, ids: [
        torch.randint(0, 256, (3, 32, 32), dtype=torch.uint8) for _ in ids])
    text = write_report(run_dir, top=24, max_rows=200).read_text()
    assert "showing 24 of 10,000 test examples" in text
    assert f"showing 200 of {int(big['label_issue'].sum()):,} candidates" in text
    li = text[text.index('id="label-issues"'):].split("</section>")[0]  # that section only
    assert li.count("<tr>") == 1 + 200
    assert text.count('class="card') == 24
    assert len(text) < 4_000_000  # a few MB at most, whatever the run size


@pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed (apt-get install "
                    "chromium); CI installs it")
def test_report_loads_in_headless_chromium(run_dir, tmp_path):
    add_explain(run_dir)
    add_similarity(run_dir)
    flag_issues(run_dir, 3)
    path = write_report(run_dir)
    profile = tmp_path / "profile"
    base = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu",
            "--disable-background-networking", "--disable-component-update", "--disable-sync",
            "--no-first-run", "--disable-dev-shm-usage", f"--user-data-dir={profile}",
            "--enable-logging=stderr", "--v=0"]
    url = path.resolve().as_uri()
    dom = subprocess.run(base + ["--dump-dom", url], capture_output=True, text=True, timeout=60)
    assert dom.returncode == 0, dom.stderr[-2000:]
    for sid in SECTION_IDS:
        assert f'id="{sid}"' in dom.stdout, sid
    shot = tmp_path / "shot.png"
    res = subprocess.run(base + [f"--screenshot={shot}", "--window-size=1280,3000",
                                 "--hide-scrollbars", url],
                         capture_output=True, text=True, timeout=60)
    assert res.returncode == 0 and shot.exists(), res.stderr[-2000:]
    im = np.asarray(Image.open(shot).convert("L"))
    assert im.shape == (3000, 1280)
    assert im.std() > 10 and (im < 128).mean() > 0.01  # not blank: text and pictures drawn
    assert not console_errors(dom.stderr + res.stderr), console_errors(dom.stderr + res.stderr)
    # the check can see errors: a page with a failing script is caught by the same filter
    bad = tmp_path / "bad.html"
    bad.write_text("<html><body><p>x</p><script>undefinedFn();</script></body></html>")
    ctl = subprocess.run(base + ["--dump-dom", bad.as_uri()], capture_output=True, text=True,
                         timeout=60)
    assert any("undefinedFn" in ln for ln in console_errors(ctl.stderr)), ctl.stderr[-2000:]


def console_errors(log: str) -> list[str]:
    """Console lines of a page (the report has no script, so any is a problem)."""
    return [ln for ln in log.splitlines()
            if "Uncaught" in ln or "ERROR:CONSOLE" in ln or ":CONSOLE" in ln]


def test_summary_counts_skipped_images(tmp_path):
    from hardprobe import pipeline
    train, test = make_folder(tmp_path / "train", 6, 0), make_folder(tmp_path / "test", 3, 1)
    (test / "dog" / "img_000.png").write_bytes(b"")
    cfg = build_config(model="cifar_resnet20", random_init=True, data="imagefolder",
                       train=str(train), test=str(test), out=str(tmp_path / "run"),
                       cache_dir=str(tmp_path / "cache"), k=3, num_workers=0, folds=2,
                       similarity=False, top=0, report=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out = pipeline.run(cfg, progress=False)
    html = write_report(out).read_text()
    assert "<b>1</b> undecodable" in html


# ---------------------------------------------------------------- fine-tuning section
def add_finetune(run_dir: Path) -> None:
    """RUN_DIR/finetune/ from the real stage (a quick head fine-tune), with 3 planted flips."""
    from hardprobe.stages.finetune.stage import finetune_run
    ex = pd.read_parquet(run_dir / "examples.parquet")
    ex["planted_noise"] = False
    ex.loc[ex.index[ex["split"] == "train"][:3], "planted_noise"] = True
    ex.to_parquet(run_dir / "examples.parquet", index=False)
    finetune_run(run_dir, mode="head", epochs=3, batch_size=8, num_workers=0, progress=False)


def test_report_finetune_section(run_dir):
    text = write_report(run_dir, top=4).read_text()
    assert 'id="finetune"' not in text and 'href="#finetune"' not in text  # only when run
    add_finetune(run_dir)
    text = write_report(run_dir, top=4).read_text()
    page = check_self_contained(text)
    assert "finetune" in page.ids and 'href="#finetune"' in text
    ft = text[text.index('id="finetune"'):]
    for part in ("Accuracy before and after", 'alt="dataset cartography"', 'alt="AUM histogram"',
                 "Frozen-feature against training-dynamics hardness", "Planted label flips",
                 "Hardest by training dynamics", "in-sample"):
        assert part in ft, part
    assert "<script" not in ft.lower() and "&lt;script&gt;alert(1)" in ft  # class names escaped
    assert ft.count("<tr>") >= 4 + 4  # accuracy table rows, hardest rows (top=4)
    decoded_images(page)
    # an interrupted fine-tune (no summary.json) is named, not fatal
    (run_dir / "finetune" / "summary.json").unlink()
    text = write_report(run_dir, top=4).read_text()
    assert "the fine-tune did not finish" in text


@pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed (apt-get install "
                    "chromium); CI installs it")
def test_finetune_section_loads_in_headless_chromium(run_dir, tmp_path):
    add_finetune(run_dir)
    path = write_report(run_dir, top=4)
    base = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu",
            "--disable-background-networking", "--disable-component-update", "--disable-sync",
            "--no-first-run", "--disable-dev-shm-usage", f"--user-data-dir={tmp_path / 'p'}",
            "--enable-logging=stderr", "--v=0"]
    dom = subprocess.run(base + ["--dump-dom", path.resolve().as_uri()], capture_output=True,
                         text=True, timeout=60)
    assert dom.returncode == 0, dom.stderr[-2000:]
    assert 'id="finetune"' in dom.stdout and 'alt="dataset cartography"' in dom.stdout
    assert not console_errors(dom.stderr), console_errors(dom.stderr)


def test_times_row_is_readable_text(run_dir):
    """Issue 13, item 9: a stage's {part: seconds} dict reads as text, not a Python dict."""
    add_similarity(run_dir, k=3)
    p = run_dir / "similarity" / "summary.json"
    s = json.loads(p.read_text())
    s["seconds"] = {"neighbors": 0.37, "geometry": 0.1, "map": 1.25}  # no "total" (older runs)
    p.write_text(json.dumps(s))
    text = write_report(run_dir, top=0).read_text()
    row = text.split("<th>times</th><td>", 1)[1].split("</td>", 1)[0]
    assert "similarity 1.7 s (neighbors 0.4 s, geometry 0.1 s, map 1.2 s)" in row
    assert "{" not in row and "&#x27;" not in row
    assert row.startswith("extract ") and " · classify " in row
