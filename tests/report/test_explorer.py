"""The explorer: packing round-trips, sprite layout, and the real page in headless Chromium."""
from __future__ import annotations

import base64
import io
import json
import re
import shutil
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image
from test_report import EVIL, add_explain, add_similarity, base_run  # noqa: F401 (fixture)

from hardprobe.errors import ConfigError
from hardprobe.report.explorer import ExploreConfig, write_explorer
from hardprobe.report.explorer.data import (
    SpriteLayout,
    SpriteWriter,
    pack_column,
    pack_table,
    unpack_column,
)

CHROMIUM, CHROMEDRIVER = Path("/usr/bin/chromium"), Path("/usr/bin/chromedriver")
CAUSES = ["ambiguous", "label error", None]


# ---------------------------------------------------------------- packing
def test_columns_round_trip_through_the_packing():
    df = pd.DataFrame({
        "f": [0.5, np.nan, -1.25, 3e-8], "i": [0, -5, 2**31 - 1, 7],
        "b": [True, False, True, True], "ob": pd.Series([True, None, False, True], dtype=object),
        "cat": ["a", "b", None, "a"], "ids": [f"test/x/{k}.png" for k in range(4)],
        "fi": [1.0, np.nan, 3.0, 1.0]})  # an int column with a hole arrives as float
    packed = pack_table(df)
    assert [packed[c]["t"] for c in df] == ["f32", "i32", "bool", "bool", "cat", "cat", "f32"]
    np.testing.assert_array_equal(unpack_column(packed["f"]), df["f"].to_numpy(np.float32))
    np.testing.assert_array_equal(unpack_column(packed["i"]), df["i"].to_numpy())
    np.testing.assert_array_equal(unpack_column(packed["b"]), [1, 0, 1, 1])
    np.testing.assert_array_equal(unpack_column(packed["ob"]), [1, np.nan, 0, 1])
    assert unpack_column(packed["cat"]) == ["a", "b", None, "a"]
    assert packed["cat"]["values"] == ["a", "b"]
    assert unpack_column(packed["ids"]) == df["ids"].tolist()
    np.testing.assert_array_equal(unpack_column(packed["fi"]), df["fi"].to_numpy(np.float32))
    many = pd.Series([f"id{k}" for k in range(1000)])  # mostly distinct: kept as a plain list
    assert pack_column(many)["t"] == "str" and unpack_column(pack_column(many)) == many.tolist()
    big = pd.Series([2**40, 1])  # beyond int32: float, not a silent wrap
    assert pack_column(big)["t"] == "f32"


def test_sprite_layout_places_every_tile_once_and_the_sheets_hold_them():
    lay = SpriteLayout(size=16, cols=3, rows=2)  # 6 tiles a sheet
    n = 14
    places = [lay.place(t) for t in range(n)]
    assert len(set(places)) == n
    assert places[0] == (0, 0, 0) and places[4] == (0, 16, 16) and places[6] == (1, 0, 0)
    assert lay.n_sheets(n) == 3 and lay.sheet_shape(n, 2) == (16, 48)  # last: 2 tiles, 1 row
    assert lay.sheet_shape(n, 0) == (32, 48)
    rng = np.random.default_rng(0)
    tiles = [rng.integers(0, 256, (16, 16, 3), dtype=np.uint8) for _ in range(n)]
    w = SpriteWriter(lay, n, fmt="png")
    assert [w.add(t) for t in tiles] == list(range(n))
    sheets = [np.asarray(Image.open(io.BytesIO(base64.b64decode(u.split(",", 1)[1]))))
              for u in w.encode()]
    assert [s.shape[:2] for s in sheets] == [(32, 48), (32, 48), (16, 48)]
    for t, tile in enumerate(tiles):  # PNG is lossless: every tile comes back exactly
        s, x, y = lay.place(t)
        np.testing.assert_array_equal(sheets[s][y:y + 16, x:x + 16], tile)


# ---------------------------------------------------------------- the run
@pytest.fixture(scope="module")
def explorer_run(base_run, tmp_path_factory) -> Path:  # noqa: F811 (the imported fixture)
    """The tiny run with explain/, similarity/ (a map laid out on a grid so that every point
    is clickable alone) and synthetic values of the columns other stages are adding."""
    run_dir = Path(shutil.copytree(base_run, tmp_path_factory.mktemp("explorer") / "run"))
    add_explain(run_dir)
    add_similarity(run_dir)
    p = run_dir / "examples.parquet"
    ex = pd.read_parquet(p)
    n = len(ex)
    ex["failure_mode"] = [CAUSES[k % 3] for k in range(n)]
    ex["evidence"] = [f"evidence <b>{k}</b>" if k % 2 else None for k in range(n)]
    ex["slice_id"] = [k % 4 for k in range(n)]
    ex["duplicate_group"] = [float(k // 2) if k % 5 == 0 else np.nan for k in range(n)]
    ex["train_duplicate"] = [ex["id"][0] if k % 7 == 0 else None for k in range(n)]
    ex["flip_severity_fog"] = np.linspace(1, 6, n)
    ex["ft_aum"] = np.linspace(-1, 1, n)
    ex.to_parquet(p, index=False)
    m = run_dir / "similarity" / "map2d.parquet"
    mp = pd.read_parquet(m)
    mp["x"], mp["y"] = np.arange(len(mp)) % 7, np.arange(len(mp)) // 7
    mp.to_parquet(m, index=False)
    return run_dir


@pytest.fixture(scope="module")
def page(explorer_run) -> Path:
    return write_explorer(explorer_run, splits=("test", "train"))


def page_data(path: Path) -> dict:
    text = path.read_text()
    blob = re.search(r'<script type="application/json" id="hp-data">(.*?)</script>', text, re.S)
    return json.loads(blob.group(1))


def test_the_page_holds_every_example_and_nothing_from_outside(page, explorer_run):
    text = page.read_text()
    assert not re.search(r"(src|href)\s*=\s*[\"']?\s*(https?:)?//", text, re.I)
    assert "@import" not in text and EVIL not in text  # a class named like a tag stays data
    data = page_data(page)
    ex = pd.read_parquet(explorer_run / "examples.parquet")
    ex = ex[ex["split"].isin(["test", "train"])].reset_index(drop=True)
    assert data["n"] == len(ex) and data["primary"] in ("model", "linear", "knn")
    assert unpack_column(data["columns"]["id"]) == ex["id"].tolist()
    np.testing.assert_allclose(unpack_column(data["columns"]["hardness"]), ex["hardness"],
                               rtol=1e-6)
    assert unpack_column(data["columns"]["failure_mode"]) == [
        None if pd.isna(v) else v for v in ex["failure_mode"]]
    assert EVIL in data["classes"]
    assert set(data["cams"]) and all(int(r) < len(ex) for r in data["cams"])
    assert data["neighbors"] and "flip_severity_fog" in data["directions"]
    assert data["report"] == "report.html"


def test_a_split_the_run_lacks_is_refused_with_the_ones_it_has(explorer_run, tmp_path):
    with pytest.raises(ConfigError, match="has train, test|has test, train"):
        write_explorer(explorer_run, splits=("val",), out=tmp_path)
    with pytest.raises(ConfigError, match="quality"):
        write_explorer(explorer_run, config=ExploreConfig(quality=0, out=str(tmp_path)))


# ---------------------------------------------------------------- the page in Chromium
@pytest.fixture(scope="module")
def browser():
    if not (CHROMIUM.exists() and CHROMEDRIVER.exists()):
        pytest.skip("no /usr/bin/chromium and /usr/bin/chromedriver: apt-get install chromium "
                    "chromium-driver to run the browser tests")
    webdriver = pytest.importorskip("selenium.webdriver", reason="pip install selenium")
    from selenium.webdriver.chrome.service import Service
    opts = webdriver.ChromeOptions()
    opts.binary_location = str(CHROMIUM)
    for a in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
              "--window-size=1400,900"):
        opts.add_argument(a)
    opts.set_capability("goog:loggingPrefs", {"browser": "ALL", "performance": "ALL"})
    driver = webdriver.Chrome(service=Service(str(CHROMEDRIVER)), options=opts)
    yield driver
    driver.quit()


def open_page(driver, url: str):
    driver.get(url)
    t0 = time.time()
    while not driver.execute_script("return document.body.dataset.ready === '1'"):
        assert time.time() - t0 < 10, "the page never became ready"
        time.sleep(0.05)


def shown(driver) -> int:
    return int(driver.find_element("id", "count").get_attribute("data-n"))


def card_id(driver) -> str:
    return driver.find_element("id", "card-id").text


def test_the_page_in_chromium(browser, page, explorer_run):
    """One page load for every browser check (the machine is small): offline, filters and
    counts, the confusion matrix, sorting, the map, and the URL fragment."""
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.support.ui import Select
    d = browser
    ex = pd.read_parquet(explorer_run / "examples.parquet")
    ex = ex[ex["split"].isin(["test", "train"])].reset_index(drop=True)
    pred = ex[f"pred_{page_data(page)['primary']}"]
    open_page(d, page.as_uri())
    assert shown(d) == len(ex)

    # a class filter, then with 'wrong' on top: counts from the parquet
    Select(d.find_element("id", "f-given")).select_by_value("1")
    assert shown(d) == int((ex["label"] == 1).sum())
    Select(d.find_element("id", "f-correct")).select_by_value("0")
    assert shown(d) == int(((ex["label"] == 1) & (ex["label"] != pred)).sum())
    d.find_element("id", "f-reset").click()
    assert shown(d) == len(ex)

    # a confusion-matrix cell: exactly those (given, predicted) examples
    pairs = pd.crosstab(ex["label"], pred).stack()
    (g, p), n = max(pairs.items(), key=lambda kv: (kv[0][0] != kv[0][1], kv[1]))
    d.find_element("css selector", f'#cm td[data-g="{g}"][data-p="{p}"]').click()
    assert shown(d) == n == int(((ex["label"] == g) & (pred == p)).sum())
    d.find_element("css selector", '#chips .chip[data-k="pair"]').click()
    assert shown(d) == len(ex)

    # sorted by hardness, highest first: the first card is the hardest example
    Select(d.find_element("id", "f-sort")).select_by_value("hardness")
    d.find_element("css selector", '#grid .cell[data-pos="0"]').click()
    hardest = ex.sort_values("hardness", ascending=False, kind="stable")["id"].iloc[0]
    assert card_id(d) == hardest
    d.find_element("id", "card-next").click()  # next = the second hardest
    assert card_id(d) == ex.sort_values("hardness", ascending=False, kind="stable")["id"].iloc[1]
    d.find_element("id", "card-close").click()

    # a point of the map opens its own card
    row = int(ex.index[ex["split"] == "test"][3])
    pt = d.execute_script(f"return hp.mapPoint({row})")
    canvas = d.find_element("id", "map")
    w, h = canvas.size["width"], canvas.size["height"]
    ActionChains(d).move_to_element_with_offset(canvas, int(pt["x"] - w / 2),
                                                int(pt["y"] - h / 2)).click().perform()
    assert card_id(d) == ex["id"][row]
    d.find_element("id", "card-close").click()

    # a box dragged on the map filters the grid to the points inside it
    mp = pd.read_parquet(explorer_run / "similarity" / "map2d.parquet")
    xy = ex[["id"]].merge(mp[["id", "x", "y"]], on="id", how="left")
    corner = {}
    for gx, gy in ((0, 0), (1, 1)):  # pixels of two grid points give the map's scale
        r = int(xy.index[(xy["x"] == gx) & (xy["y"] == gy)][0])
        corner[gx] = d.execute_script(f"return hp.mapPoint({r})")
    def px(x, y):
        return (corner[0]["x"] + x * (corner[1]["x"] - corner[0]["x"]) - w / 2,
                corner[0]["y"] + y * (corner[1]["y"] - corner[0]["y"]) - h / 2)
    (ax, ay), (bx, by) = px(0.5, 0.5), px(2.5, 2.5)  # inside the canvas
    ActionChains(d).move_to_element_with_offset(canvas, int(ax), int(ay)).click_and_hold() \
        .move_by_offset(int(bx - ax), int(by - ay)).release().perform()
    inside = int((xy["x"].between(1, 2) & xy["y"].between(1, 2)).sum())
    assert shown(d) == inside == 4
    d.find_element("css selector", '#chips .chip[data-k="box"]').click()

    # the view lives in the URL fragment: a reload restores it
    Select(d.find_element("id", "f-given")).select_by_value("2")
    d.find_element("id", "f-q").send_keys("test/")
    d.find_element("css selector", '#grid .cell[data-pos="0"]').click()
    state, opened, count = d.execute_script("return hp.state"), card_id(d), shown(d)
    assert count == int(((ex["label"] == 2) & ex["id"].str.contains("test/")).sum())
    url = d.current_url
    assert "#" in url and "given=2" in url
    d.get("about:blank")
    open_page(d, url)
    assert (d.execute_script("return hp.state"), card_id(d), shown(d)) == (state, opened, count)
    assert Select(d.find_element("id", "f-given")).first_selected_option.get_attribute(
        "value") == "2"

    # no console error, and no request but the file itself and data: URLs
    errors = [e for e in d.get_log("browser") if e["level"] == "SEVERE"]
    assert errors == []
    urls = [json.loads(e["message"])["message"]["params"].get("request", {}).get("url", "")
            for e in d.get_log("performance")
            if json.loads(e["message"])["message"]["method"] == "Network.requestWillBeSent"]
    assert urls and all(u.startswith(("file:", "data:", "about:")) for u in urls), urls
