"""The explorer in a real browser: ``streamlit run streamlit_app.py`` headless on a free local port,
driven by Debian's Chromium through Playwright. Loads the page, moves a slider with the keyboard,
checks that the accuracy shown changes (and the URL with it), and saves ``docs/screenshot.png``;
opens the Analysis page (``?page=analysis``, the result files in the checkpoint directory), checks
that its charts draw, and saves ``docs/analysis.png``; and four browser sessions at once, each on
its own URL, each showing what an independent Explorer computes for its configuration.

Needs ``/usr/bin/chromium`` (``apt-get install chromium``): skipped when it is missing, except under
``CI`` where that is a failure. Uses the real test split and the checkpoint in ``checkpoints/`` (a
snapshot copy while it is still being trained).
"""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from _apphelpers import stable_checkpoint_dir, unavailable

pytestmark = [pytest.mark.browser, pytest.mark.realdata]

REPO = Path(__file__).resolve().parent.parent
CHROMIUM = "/usr/bin/chromium"
SCREENSHOT = REPO / "docs" / "screenshot.png"
ANALYSIS_SCREENSHOT = REPO / "docs" / "analysis.png"
BROWSER_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                "--disable-dev-shm-usage"]
WAIT_MS = int(float(os.environ.get("EXPLORER_BROWSER_TIMEOUT", 900)) * 1000)  # busy 2-core machines are slow
SLIDER = "layer3.2.conv2"
# Last block only: each reuses the server's cached input of that block.
CONCURRENT = ({"layer3.2.conv2": 8}, {"layer3.2.conv2": 16}, {"layer3.2.conv2": 32}, {"layer3.2.conv1": 24})


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def chromium() -> str:
    if not os.path.exists(CHROMIUM):
        unavailable(f"{CHROMIUM} not found (apt-get install chromium)")
    return CHROMIUM


@pytest.fixture(scope="module")
def server(tmp_path_factory, jpeg_root, chromium):
    tmp = tmp_path_factory.mktemp("browser")
    ckpt_dir = stable_checkpoint_dir(tmp / "ckpts")
    port = _free_port()
    env = {**os.environ, "EXPLORER_CHECKPOINTS": str(ckpt_dir), "EXPLORER_DATA": str(jpeg_root),
           "EXPLORER_THREADS": "1", "OMP_NUM_THREADS": "1", "EXPLORER_LOG_DIR": str(tmp / "logs")}
    env.pop("EXPLORER_ALLOW_TRAINING", None)
    log = open(tmp / "streamlit.log", "wb")
    proc = subprocess.Popen([sys.executable, "-m", "streamlit", "run", str(REPO / "streamlit_app.py"),
                             "--server.headless", "true", "--server.port", str(port), "--server.address", "127.0.0.1",
                             "--browser.gatherUsageStats", "false"],
                            cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                            start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 180
        while True:
            try:
                if urllib.request.urlopen(f"{url}/_stcore/health", timeout=5).read() == b"ok":
                    break
            except OSError:
                pass
            if proc.poll() is not None or time.time() > deadline:
                log.flush()
                pytest.fail(f"streamlit did not start:\n{(tmp / 'streamlit.log').read_text()[-3000:]}")
            time.sleep(1)
        yield url
    finally:
        try:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(timeout=20)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        log.close()
        text = (tmp / "streamlit.log").read_text(errors="replace")
        assert "Traceback" not in text, text[-3000:]


def test_slider_changes_accuracy_in_chromium(server, chromium):
    from playwright.sync_api import expect, sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium, headless=True, args=BROWSER_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1600, "height": 1000})
            page.goto(f"{server}/?proj=pca&layer={SLIDER}", wait_until="domcontentloaded")
            pruned = page.locator('[data-testid="stMetric"]').filter(has_text="Pruned top-1") \
                .locator('[data-testid="stMetricValue"]')
            expect(pruned).to_contain_text("%", timeout=WAIT_MS)  # first load: data + baseline evaluation
            before = pruned.inner_text().strip()
            baseline = page.locator('[data-testid="stMetric"]').filter(has_text="Baseline top-1") \
                .locator('[data-testid="stMetricValue"]').inner_text().strip()
            assert before == baseline  # nothing clustered yet

            thumb = page.locator('[data-testid="stSlider"]').filter(has_text=SLIDER).get_by_role("slider")
            thumb.scroll_into_view_if_needed()
            thumb.focus()
            thumb.press("Home")  # k = 1: every filter of the layer replaced by one centroid
            expect(thumb).to_have_value("1", timeout=30_000)
            expect(pruned).not_to_have_text(before, timeout=WAIT_MS)
            after = pruned.inner_text().strip()
            assert after.endswith("%") and after != before
            page.wait_for_function("() => window.location.search.includes('k.layer3.2.conv2=1')", timeout=60_000)
            page.wait_for_timeout(2000)  # let the charts finish drawing
            # Back to the top of the sidebar (checkpoint picker, options) for the picture.
            page.locator('[data-testid="stSidebar"]').evaluate(
                "e => [e, ...e.querySelectorAll('*')].forEach(n => { if (n.scrollTop > 0) n.scrollTop = 0; })")
            page.wait_for_timeout(500)
            SCREENSHOT.parent.mkdir(parents=True, exist_ok=True)
            page.screenshot(path=str(SCREENSHOT))
        finally:
            browser.close()


def test_analysis_page_in_chromium(server, chromium):
    """The Analysis page with the result files beside the checkpoint: every section renders (charts or
    the st.info naming the command that is missing), no exception; a full-height screenshot."""
    from playwright.sync_api import expect, sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium, headless=True, args=BROWSER_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1600, "height": 1000})
            page.goto(f"{server}/?page=analysis", wait_until="domcontentloaded")
            for heading in ("Layer sensitivity", "Accuracy vs MACs", "Fine-tuning"):
                expect(page.get_by_role("heading", name=heading).first).to_be_visible(timeout=120_000)
            charts = page.locator('[data-testid="stVegaLiteChart"]')
            expect(charts.first).to_be_visible(timeout=60_000)
            page.wait_for_function(  # every chart drawn (vega-embed puts a canvas or an svg in each)
                """() => { const c = document.querySelectorAll('[data-testid="stVegaLiteChart"]');
                           return c.length > 0 && [...c].every(e => e.querySelector('canvas, svg')); }""",
                timeout=60_000)
            assert page.locator('[data-testid="stException"]').count() == 0
            # Everything in one picture: grow the window to the page's content height (twice: charts and
            # tables re-layout to the new size, which can change the height again).
            for _ in range(2):
                height = page.evaluate("""() => Math.max(...[...document.querySelectorAll('*')]
                                            .map(e => e.scrollHeight || 0))""")
                page.set_viewport_size({"width": 1600, "height": min(6000, max(1000, int(height) + 80))})
                page.wait_for_timeout(3000)
            ANALYSIS_SCREENSHOT.parent.mkdir(parents=True, exist_ok=True)
            page.screenshot(path=str(ANALYSIS_SCREENSHOT))
        finally:
            browser.close()


@pytest.fixture(scope="module")
def expected(jpeg_root, tmp_path_factory):
    """Headline values of the CONCURRENT configurations from an Explorer of this process."""
    import torch

    from explorer import checkpoints as ckpt
    from explorer.app import charts, state
    from explorer.clustering import ClusteringConfig
    from explorer.data import load_cifar10
    from explorer.pipeline import Explorer

    torch.set_num_threads(1)
    d = stable_checkpoint_dir(tmp_path_factory.mktemp("expected"))
    exp = Explorer(ckpt.load_model(d / f"{ckpt.DEFAULT_NAME}.pt"), load_cifar10(jpeg_root), ckpt.DEFAULT_NAME)
    out = []
    for ks in CONCURRENT:
        r = exp.run(ClusteringConfig(ks=ks, **state.APP_DEFAULTS))  # what a URL with only ks shows
        out.append((charts.pct(r.evaluation.top1), charts.count(r.compression.params)))
    assert len({p for _, p in out}) == len(CONCURRENT)  # four genuinely different configurations
    return out


def test_concurrent_sessions_in_chromium(server, chromium, expected):
    """Four teammates at once: four browser sessions open their own URLs on the one server (one
    shared Explorer) before any answer is awaited; each shows its own configuration's top-1 and
    unique parameters, and keeps its own URL."""
    from playwright.sync_api import expect, sync_playwright

    def metric(page, label):
        return page.locator('[data-testid="stMetric"]').filter(has_text=label).locator('[data-testid="stMetricValue"]')

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium, headless=True, args=BROWSER_ARGS)
        try:
            pages = [browser.new_context(viewport={"width": 1400, "height": 900}).new_page() for _ in CONCURRENT]
            queries = ["&".join(f"k.{layer}={k}" for layer, k in ks.items()) for ks in CONCURRENT]
            for page, q in zip(pages, queries):
                page.goto(f"{server}/?proj=pca&{q}", wait_until="commit")
            for page, q, (top1, params) in zip(pages, queries, expected):
                expect(metric(page, "Pruned top-1")).to_have_text(top1, timeout=WAIT_MS)
                expect(metric(page, "Unique parameters")).to_have_text(params, timeout=60_000)
                assert q in page.url
            assert all(p.locator('[data-testid="stException"]').count() == 0 for p in pages)
        finally:
            browser.close()
