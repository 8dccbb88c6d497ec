"""`dvc plots show` draws its charts with no network: .dvc/config points DVC at
.dvc/plots-template.html, which carries Vega, Vega-Lite and vega-embed inline (built by
scripts/build_plots_template.py). Checked in headless Chromium with the network off, beside
DVC's own template, whose charts load the libraries from jsDelivr and stay blank offline."""

from __future__ import annotations

import json
import os
import re
import shutil
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from tests.support import ROOT, command_env, run
from tests.team_support import headless_chromium

TEMPLATE = ROOT / ".dvc" / "plots-template.html"
LOCK_FILE = ROOT / "scripts" / "plots-template" / "package-lock.json"
SCREENSHOT = ROOT / "docs" / "plots-offline.png"
LIBRARIES = ("vega", "vega-lite", "vega-embed")
EPOCHS = 12
TEST_IMAGES = 179  # as many as the demo's test split
IMAGE_PLOTS = [
    p for p in yaml.safe_load((ROOT / "dvc.yaml").read_text())["plots"] if isinstance(p, str)
]

# Per chart container (the <div> around each `vegaEmbed('#<id>', spec)` call, whose script
# vega-embed replaces): did vega-embed take it, and how many of its canvas pixels are coloured
# (data marks; axes and text are grey on white)?
CHARTS_JS = """
return arguments[0].map(id => {
    const box = document.getElementById(id);
    const canvas = box.querySelector('canvas');
    let coloured = 0;
    if (canvas && canvas.width && canvas.height) {
      const rgba = canvas.getContext('2d').getImageData(0, 0, canvas.width, canvas.height).data;
      for (let i = 0; i < rgba.length; i += 4) {
        const [r, g, b] = [rgba[i], rgba[i + 1], rgba[i + 2]];
        if (rgba[i + 3] > 0 && Math.max(r, g, b) - Math.min(r, g, b) > 40) coloured++;
      }
    }
    const svgMarks = box.querySelectorAll('svg .mark-line path, svg .mark-rect path').length;
    return {id: box.id, embedded: box.classList.contains('vega-embed'),
            canvas: Boolean(canvas), svg: Boolean(box.querySelector('svg.marks')),
            coloured: coloured, svgMarks: svgMarks};
  });
"""
STATE_JS = """
return {ready: document.readyState, vegaEmbed: typeof window.vegaEmbed,
        images: [...document.images].map(img => [img.getAttribute('src'), img.naturalWidth])};
"""


def write_plot_files(project: Path) -> None:
    """models/<model>/history.csv and plots/<model>/ for every model in params.yaml, made by the
    pipeline's own writers (imgpipe.model_folder, imgpipe.evaluation) from seeded made-up
    predictions on the demo digits with each model's committed test accuracy and loss. The real
    files are DVC outputs, which git does not hold."""
    from imgpipe.demo import digits_images
    from imgpipe.evaluation import plot_files
    from imgpipe.model_folder import history_csv

    pixels, labels = digits_images()  # (N, 8, 8), (N,)
    images = np.repeat(pixels[:TEST_IMAGES, :, :, None], 3, axis=3)  # (T, 8, 8, 3)
    labels = labels[:TEST_IMAGES]
    class_names = [str(digit) for digit in range(10)]
    rng = np.random.default_rng(0)
    models = yaml.safe_load((project / "params.yaml").read_text())["models"]
    for model in models:
        metrics = json.loads((project / "metrics" / f"{model}.json").read_text())
        accuracy, loss = metrics["accuracy"], metrics["loss"]
        wrong = rng.random(TEST_IMAGES) > accuracy
        predicted = np.where(wrong, (labels + rng.integers(1, 10, TEST_IMAGES)) % 10, labels)
        logits = rng.normal(0, 1, (TEST_IMAGES, 10))  # (T, 10)
        logits[np.arange(TEST_IMAGES), predicted] += 4
        proba = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
        decay = np.exp(-np.arange(EPOCHS) / 4)  # curves that end near the committed metrics
        history = {
            "loss": list(0.9 * loss + 2 * decay),
            "accuracy": list(min(1, accuracy + 0.01) - 0.8 * decay),
            "val_loss": list(loss + 2 * decay),
            "val_accuracy": list(accuracy - 0.8 * decay),
        }
        (project / "models" / model).mkdir(parents=True)
        (project / "models" / model / "history.csv").write_text(history_csv(history))
        grid = np.arange(8)
        files = plot_files(model, labels, proba, class_names, history, (grid, images[grid]))
        (project / "plots" / model).mkdir(parents=True)
        for name, data in files.items():
            (project / "plots" / model / name).write_bytes(data)


@dataclass(frozen=True)
class Pages:
    """index.html written by `dvc plots show` with this project's template and with DVC's."""

    offline: Path
    cdn: Path


@pytest.fixture(scope="module")
def pages(tmp_path_factory: pytest.TempPathFactory) -> Pages:
    """A git + DVC project with the committed dvc.yaml, params, metrics and .dvc/ (its config and
    template), plot files written, and both pages rendered by `dvc plots show`. No dvc.lock: its
    hashes would send DVC to a cache that holds the real plot files, and this one is empty."""
    from dvc_render.html import PAGE_HTML

    project = tmp_path_factory.mktemp("plots")
    for name in ("dvc.yaml", "params.yaml", ".dvcignore", ".gitignore"):
        shutil.copy(ROOT / name, project / name)
    shutil.copytree(ROOT / "metrics", project / "metrics")
    (project / ".dvc").mkdir()
    for name in ("config", ".gitignore", TEMPLATE.name):
        shutil.copy(ROOT / ".dvc" / name, project / ".dvc" / name)
    write_plot_files(project)
    env = command_env()
    run(["git", "init", "-q", "-b", "main"], project, env)
    (project / "dvc-default.html").write_text(PAGE_HTML)
    written = []
    for args in ([], ["--html-template", "dvc-default.html", "-o", "dvc_plots_cdn"]):
        output = run(["dvc", "plots", "show", *args], project, env, timeout=120)
        assert "failed to load" not in output, output  # DVC says so and still exits 0
        written.append(project / (args[-1] if args else "dvc_plots") / "index.html")
        assert written[-1].as_uri() in output, output
    return Pages(*written)


@dataclass(frozen=True)
class PageReport:
    """What an offline browser made of a page."""

    charts: list[dict]  # CHARTS_JS per chart
    images: list[list]  # [src, naturalWidth] per <img>
    vega_embed: str  # typeof window.vegaEmbed
    errors: list[str]  # console messages of level SEVERE
    requests: list[str]  # URLs the page asked the network for (http, https, ws)

    def drawn(self) -> list[dict]:
        """Charts that vega-embed took and drew with coloured marks."""
        return [c for c in self.charts if c["embedded"] and (c["coloured"] > 100 or c["svgMarks"])]


@pytest.fixture(scope="module")
def offline_browser(
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[Callable[[Path, Path | None], PageReport]]:
    """Headless Chromium that cannot reach any host: every name resolves to nothing and DevTools
    emulates a lost connection. Yields open_page(page, screenshot_path) -> PageReport."""
    driver = headless_chromium(
        "1300,1000",
        "--host-resolver-rules=MAP * ~NOTFOUND",  # no DNS: jsDelivr cannot be reached
        logging_prefs={"browser": "ALL", "performance": "ALL"},
    )
    driver.execute_cdp_cmd("Network.enable", {})
    driver.execute_cdp_cmd(
        "Network.emulateNetworkConditions",
        {"offline": True, "latency": 0, "downloadThroughput": 0, "uploadThroughput": 0},
    )

    def open_page(page: Path, screenshot: Path | None = None) -> PageReport:
        driver.get_log("browser")  # drop messages of earlier pages
        driver.get_log("performance")
        chart_ids = re.findall(r"vegaEmbed\('#([^']+)'", page.read_text(encoding="utf-8"))
        driver.get(page.as_uri())
        deadline = time.monotonic() + 30
        while True:  # until every chart is drawn, or the page is loaded and cannot draw them
            state = driver.execute_script(STATE_JS)
            charts = driver.execute_script(CHARTS_JS, chart_ids)
            report = PageReport(charts, state["images"], state["vegaEmbed"], [], [])
            loaded = state["ready"] == "complete"
            if loaded and (len(report.drawn()) == len(charts) or state["vegaEmbed"] != "function"):
                break
            if time.monotonic() > deadline:
                break
            time.sleep(0.5)
        if screenshot is not None:
            driver.save_screenshot(str(screenshot))
        errors = [e["message"] for e in driver.get_log("browser") if e["level"] == "SEVERE"]
        requests = []
        for entry in driver.get_log("performance"):
            message = json.loads(entry["message"])["message"]
            if message["method"] == "Network.requestWillBeSent":
                url = message["params"]["request"]["url"]
                if url.startswith(("http:", "https:", "ws:", "wss:")):
                    requests.append(url)
        return PageReport(charts, state["images"], state["vegaEmbed"], errors, requests)

    try:
        yield open_page
    finally:
        driver.quit()


@pytest.mark.slow
def test_plots_page_draws_every_chart_offline(
    pages: Pages, offline_browser: Callable[[Path, Path | None], PageReport], tmp_path: Path
) -> None:
    shot = tmp_path / "plots-offline.png"
    report = offline_browser(pages.offline, shot)
    assert len(report.charts) == 4, report.charts  # loss, accuracy, confusion matrix, ROC
    assert report.drawn() == report.charts, f"not all charts drawn (see {shot}): {report.charts}"
    assert report.errors == [], report.errors
    assert report.requests == [], f"the page asked the network for {report.requests}"
    assert len(report.images) == len(IMAGE_PLOTS), report.images
    assert all(width > 0 for _, width in report.images), report.images
    if os.environ.get("IMGPIPE_UPDATE_SCREENSHOT"):  # refresh docs/plots-offline.png
        with Image.open(shot) as image:
            image.convert("RGB").quantize(colors=64).save(SCREENSHOT, optimize=True)


@pytest.mark.slow
def test_dvc_default_template_draws_nothing_offline(
    pages: Pages, offline_browser: Callable[[Path, Path | None], PageReport]
) -> None:
    """The same check on DVC's own page fails: the check detects charts that need the CDN."""
    report = offline_browser(pages.cdn, None)
    assert len(report.charts) == 4, report.charts
    assert report.drawn() == []
    assert report.vega_embed == "undefined"
    assert any("vegaEmbed is not defined" in error for error in report.errors), report.errors
    assert any(url.startswith("https://cdn.jsdelivr.net/") for url in report.requests)


def test_committed_template_matches_config_and_lock_file() -> None:
    """.dvc/config names the template; it keeps DVC's {plot_divs}, adds no CDN {scripts}, and
    carries the library versions package-lock.json pins (rebuild it after `npm ci`)."""
    config = (ROOT / ".dvc" / "config").read_text()
    assert f"html_template = {TEMPLATE.name}" in config  # DVC resolves it inside .dvc/
    page = TEMPLATE.read_text(encoding="utf-8")
    assert page.count("{plot_divs}") == 1 and "{scripts}" not in page
    assert "cdn.jsdelivr.net" not in page
    packages = json.loads(LOCK_FILE.read_text())["packages"]
    for library in LIBRARIES:
        version = packages[f"node_modules/{library}"]["version"]
        assert f"/*!\n * {library} {version} (BSD-3-Clause)" in page, (library, version)
