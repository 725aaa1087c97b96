"""Benchmark the explorer page: size, time to interactive, filter time, write time.

    python benchmarks/bench_explorer.py [RUN_DIR] [--screenshots docs/]

RUN_DIR defaults to a copy of /work/runs/r56 (the run is never written to: the pages go to a
temporary folder). Budgets (issue 15): the 10,000-image test split gives a page of <= ~15 MB,
interactive in < 2 s in headless Chromium, a filter over 10,000 examples in < 100 ms (timed
inside the page with performance.now()); the page of all splits is written in seconds.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import re
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

from hardprobe.report.explorer import write_explorer

DEFAULT_RUN = Path("/work/runs/r56")


def machine() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
    except OSError:
        return platform.processor()
    model = re.search(r"Model name:\s*(.+)", out)
    flags = set(re.findall(r"\b(avx512_bf16|amx_bf16|amx_tile|amx_int8)\b", out))
    cores = re.search(r"^CPU\(s\):\s*(\d+)", out, re.M)
    return (f"{model.group(1).strip() if model else '?'}, {cores.group(1) if cores else '?'} "
            f"CPUs, bf16/AMX flags: {', '.join(sorted(flags)) or 'none'}")


def browser():
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    opts = webdriver.ChromeOptions()
    opts.binary_location = "/usr/bin/chromium"
    for a in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
              "--window-size=1400,900"):
        opts.add_argument(a)
    return webdriver.Chrome(service=Service("/usr/bin/chromedriver"), options=opts)


def time_to_interactive(driver, page: Path, reps: int = 3) -> list[float]:
    """Seconds from navigation start to the page's ready mark (data decoded, grid, confusion
    and map drawn), as the page measures it (performance.now() at the end of its start-up)."""
    out = []
    for _ in range(reps):
        driver.get("about:blank")
        driver.get(page.as_uri())
        while not driver.execute_script("return document.body.dataset.ready === '1'"):
            time.sleep(0.02)
        while driver.execute_script("return hp.imagesAt === undefined"):
            time.sleep(0.02)
        out.append(driver.execute_script("return [hp.readyAt, hp.imagesAt]"))
    return [(a / 1000, b / 1000) for a, b in out]


def filter_ms(driver) -> dict:
    """ms per filter pass (predicates + confusion counts over every example), in the page."""
    cases = {"class": {"given": "3"}, "class+wrong": {"given": "3", "correct": "0"},
             "confusion cell": {"pair": "3,5"}, "text search": {"q": "cat/00"},
             "score range": {"sc": "hardness", "lo": "0.5", "hi": "1"}}
    return {k: driver.execute_script(f"return hp.timeFilter({json.dumps(v)}, 20)")
            for k, v in cases.items()}


def screenshots(driver, page: Path, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    driver.get(page.as_uri())
    time.sleep(1.0)
    driver.save_screenshot(str(out / "explorer-grid.png"))
    driver.execute_script("hp.set({open: hp.id(hp.rows()[0])})")
    time.sleep(0.5)
    driver.save_screenshot(str(out / "explorer-card.png"))
    driver.execute_script("hp.set({open: '', correct: '0', color: 'hardness'})")
    time.sleep(0.3)
    driver.find_element("id", "map-section").screenshot(str(out / "explorer-map.png"))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run_dir", nargs="?", default=str(DEFAULT_RUN))
    ap.add_argument("--screenshots", default=None, help="folder for the three screenshots")
    args = ap.parse_args()
    print("machine:", machine())
    with tempfile.TemporaryDirectory() as tmp:
        t0, c0 = time.perf_counter(), time.process_time()
        page = write_explorer(args.run_dir, splits=("test",), out=Path(tmp) / "test.html")
        t_test, c_test = time.perf_counter() - t0, time.process_time() - c0
        size = page.stat().st_size / 1e6
        print(f"test split: page {size:.2f} MB (budget <= ~15 MB), written in {t_test:.1f} s "
              f"wall, {c_test:.1f} s CPU; load average {os.getloadavg()[0]:.1f}")
        d = browser()
        try:
            tti = time_to_interactive(d, page)
            ready = [a for a, _ in tti]
            print(f"time to interactive: median {statistics.median(ready):.2f} s over "
                  f"{len(tti)} loads ({', '.join(f'{t:.2f}' for t in ready)}) (budget < 2 s); "
                  f"every sprite sheet decoded at median "
                  f"{statistics.median(b for _, b in tti):.2f} s")
            ms = filter_ms(d)
            print("filter over", d.execute_script("return hp.rows().length"), "examples:",
                  ", ".join(f"{k} {v:.2f} ms" for k, v in ms.items()), "(budget < 100 ms)")
            cells = d.execute_script("return document.querySelectorAll('#grid .cell').length")
            print(f"grid cells in the DOM: {cells} (virtualised); redraw per scroll jump: "
                  f"{d.execute_script('return hp.timeScroll(100)'):.2f} ms (a frame is 16.7 ms)")
            if args.screenshots:
                screenshots(d, page, Path(args.screenshots))
                print("screenshots ->", args.screenshots)
        finally:
            d.quit()
        t0, c0 = time.perf_counter(), time.process_time()
        from hardprobe.rundir.run import load_run
        splits = tuple(load_run(args.run_dir).splits)
        allp = write_explorer(args.run_dir, splits=splits, out=Path(tmp) / "all.html")
        n = len(load_run(args.run_dir).examples)
        print(f"all splits ({'+'.join(splits)}, {n} examples): written in "
              f"{time.perf_counter() - t0:.1f} s wall, {time.process_time() - c0:.1f} s CPU, page {allp.stat().st_size / 1e6:.1f} MB")


if __name__ == "__main__":
    main()
