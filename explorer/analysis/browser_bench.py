"""Browser benchmark of the app (:func:`run_moves`, :func:`run_load`; command line:
``python -m explorer.bench --browser`` and ``--browser --load``).

What a teammate perceives, measured in one run on this machine: ``streamlit run --server.headless
true`` on a free local port, driven by Chromium (``/usr/bin/chromium``) through Playwright.

- :func:`run_moves`: one session moves one slider at a time by keyboard from the unclustered view
  (``Home``: the layer to k = 1), then back (``End``: the unclustered view again, a cached
  configuration), layer after layer (:data:`MOVES`). Per move: the browser time (key press until the
  headline shows the new full-test result, is not stale, and Streamlit's status widget is gone), the
  time to the first visible change (the labelled preview, or the new headline), the engine time of
  the same configuration timed in-process with :class:`explorer.pipeline.Explorer` on the same
  checkpoint and data with the app's defaults (preview + full run, what the page waits for; the
  same sequence, so the same caches), and the page's overhead (browser - engine); then median / p90.
  The engine is timed before the server starts, so neither competes with the other.
- :func:`run_load`: N sessions at once (separate browser contexts of one Chromium), each moving
  random sliders for D minutes. Reports exceptions on any page, per-move p50 / p90, the server
  process's peak RSS (``VmHWM``), and checks each session's final headline top-1 against an
  independent Explorer's evaluation of the configuration its URL names.

A benchmark, not a test: nothing here asserts a timing. The figures of the last runs are in
docs/app.md ("How fast the page answers").
"""
from __future__ import annotations

import asyncio
import contextlib
import gc
import os
import random
import re
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent.parent
CHROMIUM = "/usr/bin/chromium"
BROWSER_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update"]
# The layers the measurement moved, stem to last block.
MOVES = ("conv1", "layer1.1.conv1", "layer2.0.conv1", "layer2.1.conv2", "layer3.0.conv2", "layer3.2.conv2")
RSS_LIMIT_MB = 4096

# Installed in the page before a key press: records the key press, the first visible change and the
# moment the headline shows ``expected`` (when given; else any new, fresh headline with the URL's
# ``url_key`` parameter exactly ``url_value``, or absent for null) with nothing stale and no status
# widget. Polls every 5 ms (textContent only,
# which forces no layout).
WATCH_JS = """
(args) => {
  const s = {t0: null, first: null, done: null};
  if (window.__bench && window.__bench.timer) clearInterval(window.__bench.timer);
  window.__bench = s;
  document.addEventListener('keydown', () => { if (s.t0 === null) s.t0 = performance.now(); },
                            {capture: true, once: true});
  const q = (sel) => [...document.querySelectorAll(sel)];
  const fresh = (e) => { const c = e.closest('[data-testid="stElementContainer"]');
                         return !c || c.getAttribute('data-stale') !== 'true'; };
  s.timer = setInterval(() => {
    if (s.t0 === null) return;
    const now = performance.now();
    const m = q('[data-testid="stMetric"]').find(e => e.textContent.includes('Pruned top-1'));
    const value = m ? m.querySelector('[data-testid="stMetricValue"]').textContent.trim() : null;
    const preview = q('[data-testid="stAlert"]').some(e => e.textContent.includes('Preview on'));
    if (s.first === null && (preview || (value !== null && value !== args.before && fresh(m)))) s.first = now;
    if (q('[data-testid="stStatusWidget"]').length || preview || !m || !fresh(m)) return;
    const caps = q('[data-testid="stCaptionContainer"]').filter(fresh).map(e => e.textContent);
    const ok = args.expected !== null
      ? value === args.expected && caps.some(c => c.includes(args.correct))
      : new URLSearchParams(window.location.search).get(args.url_key) === args.url_value
        && caps.some(c => c.includes('test images correct'));
    if (ok) { s.done = now; if (s.first === null) s.first = now; clearInterval(s.timer); }
  }, 5);
}
"""


def _log(msg: str) -> None:
    print(f"[browser-bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _pct(xs, q) -> float:
    return float(np.percentile(xs, q)) if xs else float("nan")


def proc_rss_mb(pid: int, field_name: str = "VmHWM") -> float:
    """Peak (``VmHWM``) or current (``VmRSS``) resident set size of process ``pid`` in MB (Linux /proc)."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(field_name + ":"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


class AppServer:
    """``streamlit run streamlit_app.py --server.headless true`` on a free local port, with
    ``checkpoint``'s directory as the checkpoint directory; a context manager (stopped on exit, its
    whole process group). ``log`` holds its output; ``peak_rss_mb()`` its peak resident memory."""

    def __init__(self, checkpoint: Path, data_root: str | None, threads: int | None = None, start_s: float = 300):
        self.checkpoint, self.data_root, self.threads, self.start_s = Path(checkpoint), data_root, threads, start_s
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self._tmp = tempfile.TemporaryDirectory(prefix="browser-bench-")
        self.log = Path(self._tmp.name) / "streamlit.log"
        self.proc: subprocess.Popen | None = None

    def __enter__(self) -> "AppServer":
        env = {**os.environ, "EXPLORER_CHECKPOINTS": str(self.checkpoint.parent),
               "EXPLORER_LOG_DIR": str(Path(self._tmp.name) / "logs")}
        if self.data_root:
            env["EXPLORER_DATA"] = str(self.data_root)
        if self.threads:
            env["EXPLORER_THREADS"] = str(self.threads)
        env.pop("EXPLORER_ALLOW_TRAINING", None)
        self._out = open(self.log, "wb")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "streamlit", "run", str(REPO / "streamlit_app.py"), "--server.headless", "true",
             "--server.port", str(self.port), "--server.address", "127.0.0.1", "--browser.gatherUsageStats", "false"],
            cwd=REPO, env=env, stdout=self._out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            start_new_session=True)
        deadline = time.time() + self.start_s
        while True:
            try:
                if urllib.request.urlopen(f"{self.url}/_stcore/health", timeout=5).read() == b"ok":
                    return self
            except OSError:
                pass
            if self.proc.poll() is not None or time.time() > deadline:
                self.__exit__(None, None, None)
                raise RuntimeError(f"streamlit did not start:\n{self.log.read_text(errors='replace')[-2000:]}")
            time.sleep(0.5)

    def peak_rss_mb(self) -> float:
        return proc_rss_mb(self.proc.pid) if self.proc else 0.0

    def tracebacks(self) -> list[str]:
        text = self.log.read_text(errors="replace") if self.log.exists() else ""
        return [t[:1500] for t in text.split("Traceback")[1:]]

    def __exit__(self, *exc) -> None:
        if self.proc is not None and self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGTERM)
                self.proc.wait(timeout=20)
            except (ProcessLookupError, subprocess.TimeoutExpired):
                try:
                    os.killpg(self.proc.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
        if getattr(self, "_out", None):
            self._out.close()


# ---------------------------------------------------------------- the page, driven by keyboard

def _metric(page, label: str):
    return page.locator('[data-testid="stMetric"]').filter(has_text=label).locator('[data-testid="stMetricValue"]')


def _slider(page, layer: str):
    label = page.locator('[data-testid="stWidgetLabel"]', has_text=re.compile(rf"^{re.escape(layer)} ·"))
    return page.locator('[data-testid="stSlider"]').filter(has=label).get_by_role("slider")


async def _open(page, url: str, timeout_ms: float) -> None:
    """Load the page and wait for the unclustered headline, settled."""
    await page.goto(url, wait_until="domcontentloaded")
    await _metric(page, "Pruned top-1").first.wait_for(timeout=timeout_ms)
    await page.wait_for_function("() => !document.querySelector('[data-testid=\"stStatusWidget\"]')",
                                 timeout=timeout_ms)


async def _move(page, layer: str, key: str, timeout_ms: float, expected: str | None = None,
                correct: str | None = None, url_key: str = "", url_value: str | None = None) -> dict:
    """Press ``key`` on ``layer``'s slider and time it (:data:`WATCH_JS`); seconds."""
    thumb = _slider(page, layer)
    await thumb.scroll_into_view_if_needed()
    await thumb.focus()
    before = (await _metric(page, "Pruned top-1").first.inner_text()).strip()
    await page.evaluate(WATCH_JS, {"before": before, "expected": expected, "correct": correct or "",
                                   "url_key": url_key, "url_value": url_value})
    await thumb.press(key)
    await page.wait_for_function("() => window.__bench.done !== null", timeout=timeout_ms, polling=50)
    s = await page.evaluate("() => ({t0: window.__bench.t0, first: window.__bench.first, done: window.__bench.done})")
    value = (await _metric(page, "Pruned top-1").first.inner_text()).strip()
    return {"browser_s": (s["done"] - s["t0"]) / 1000, "first_s": (s["first"] - s["t0"]) / 1000, "top1_shown": value}


async def _exceptions(page) -> int:
    return await page.locator('[data-testid="stException"]').count()


# ---------------------------------------------------------------- engine timings (in-process)

@dataclass
class Step:
    """One slider move: ``layer`` to ``k`` by ``key``; ``config`` is the configuration after it."""

    layer: str
    key: str
    k: int
    config: object
    kind: str  # "new" or "cached"
    engine: dict = field(default_factory=dict)


def plan(layers=MOVES) -> list[Step]:
    """The moves of :func:`run_moves`: each layer to k = 1 from the unclustered view, then back."""
    from ..pipeline import app_default_config
    from ..model import conv_layer

    base, steps = app_default_config(), []
    for layer in layers:
        steps.append(Step(layer, "Home", 1, base.with_k(layer, 1), "new"))
        steps.append(Step(layer, "End", conv_layer(layer).filters, base, "cached"))
    return steps


def engine_times(explorer, steps: list[Step]) -> None:
    """Time each step's configuration as the page computes it (a preview when not cached, then the
    full run), in order, on ``explorer``; fills ``step.engine`` (seconds, top-1, correct count)."""
    from ..pipeline import app_default_config

    explorer.run(app_default_config())  # the page's first answer: nothing clustered
    for step in steps:
        t = time.perf_counter()
        if step.config.active and explorer.cached(step.config) is None:
            explorer.preview(step.config)
        t_preview = time.perf_counter() - t
        result = explorer.run(step.config)
        total = time.perf_counter() - t
        step.engine = {"engine_s": total, "engine_preview_s": t_preview, "top1": _pct_text(result.evaluation.top1),
                       "correct": f"{int(np.trace(result.evaluation.confusion)):,} of "
                                  f"{int(result.evaluation.confusion.sum()):,} test images correct"}


def _pct_text(fraction: float) -> str:
    """Top-1 as the page's headline writes it (explorer.app.charts.pct: one decimal)."""
    return f"{100 * fraction:.1f}%"


def _load_explorer(checkpoint: Path, data_root: str | None):
    from .. import checkpoints as ckpt
    from ..data import load_cifar10
    from ..pipeline import Explorer

    exp = Explorer(ckpt.load_model(checkpoint), load_cifar10(data_root), checkpoint.stem)
    exp.warm()  # as the app's loader does: the first move's engine time leaves out the same work
    return exp


# ---------------------------------------------------------------- one session, one slider at a time

def _serving(server: AppServer | None, checkpoint: Path, data_root: str | None, threads: int | None):
    """``server`` as a context that leaves it running (a caller's, shared by several runs), else a new one."""
    if server is not None:
        return contextlib.nullcontext(server)
    _log("starting streamlit")
    return AppServer(checkpoint, data_root, threads)


def run_moves(checkpoint: str | Path, data_root: str | None = None, layers=MOVES, pause_s: float = 2.0,
              timeout_s: float = 900, threads: int | None = None, server: AppServer | None = None,
              explorer=None) -> dict:
    """The per-move benchmark of the module doc. ``pause_s``: the wait after each answer before the
    next key press (a user reading it; long enough for the seed spread to start). ``server`` /
    ``explorer``: a running :class:`AppServer` and an in-process Explorer of the same checkpoint to
    use instead of new ones (the smoke test shares them; a benchmark should not: the engine timings
    are meant to be taken with no server running). Returns a JSON-ready dict: ``moves`` (one row
    per move) and ``summary``."""
    checkpoint = Path(checkpoint)
    steps = plan(layers)
    _log(f"engine timings in-process ({len(steps)} moves)")
    own = explorer is None
    explorer = _load_explorer(checkpoint, data_root) if own else explorer
    engine_times(explorer, steps)
    if own:
        del explorer
        gc.collect()
    with _serving(server, checkpoint, data_root, threads) as server:
        rows = asyncio.run(_moves_session(server, steps, pause_s, timeout_s))
        peak = server.peak_rss_mb()
        tracebacks = server.tracebacks()
    new = [r for r in rows if r["kind"] == "new"]
    cached = [r for r in rows if r["kind"] == "cached"]
    summary = {
        "moves": len(rows), "pause_s": pause_s,
        "new_browser_median_s": statistics.median(r["browser_s"] for r in new) if new else None,
        "new_browser_p90_s": _pct([r["browser_s"] for r in new], 90),
        "new_first_median_s": statistics.median(r["first_s"] for r in new) if new else None,
        "new_overhead_median_s": statistics.median(r["overhead_s"] for r in new) if new else None,
        "cached_browser_median_s": statistics.median(r["browser_s"] for r in cached) if cached else None,
        "cached_browser_max_s": max((r["browser_s"] for r in cached), default=None),
        "server_peak_rss_mb": peak, "server_tracebacks": tracebacks,
        "all_shown_as_expected": all(r["top1_shown"] == r["top1_expected"] for r in rows),
    }
    return {"moves": rows, "summary": summary}


async def _moves_session(server: AppServer, steps: list[Step], pause_s: float, timeout_s: float) -> list[dict]:
    from playwright.async_api import async_playwright

    timeout_ms = timeout_s * 1000
    rows = []
    async with async_playwright() as p:
        browser = await p.chromium.launch(executable_path=CHROMIUM, headless=True, args=BROWSER_ARGS)
        try:
            page = await (await browser.new_context(viewport={"width": 1600, "height": 1000})).new_page()
            await _open(page, f"{server.url}/?ckpt={server.checkpoint.stem}", timeout_ms)
            await asyncio.sleep(pause_s)
            for step in steps:
                t = await _move(page, step.layer, step.key, timeout_ms, step.engine["top1"], step.engine["correct"])
                row = {"layer": step.layer, "k": step.k, "kind": step.kind, **t,
                       "engine_s": step.engine["engine_s"], "engine_preview_s": step.engine["engine_preview_s"],
                       "overhead_s": t["browser_s"] - step.engine["engine_s"], "top1_expected": step.engine["top1"]}
                rows.append(row)
                _log(f"{step.layer} -> k={step.k} ({step.kind}): browser {row['browser_s']:.2f} s, first "
                     f"{row['first_s']:.2f} s, engine {row['engine_s']:.2f} s")
                await asyncio.sleep(pause_s)
            if await _exceptions(page):
                raise RuntimeError("an exception is shown on the page")
        finally:
            await browser.close()
    return rows


def format_moves(r: dict) -> str:
    """The per-move table and the summary of :func:`run_moves`."""
    out = [f"{'move':<28}{'browser s':>10}{'first s':>9}{'engine s':>10}{'page s':>8}  top-1"]
    for m in r["moves"]:
        out.append(f"{m['layer'] + ' -> ' + str(m['k']) + (' (cached)' if m['kind'] == 'cached' else ''):<28}"
                   f"{m['browser_s']:10.2f}{m['first_s']:9.2f}{m['engine_s']:10.2f}{m['overhead_s']:8.2f}  "
                   f"{m['top1_shown']}{'' if m['top1_shown'] == m['top1_expected'] else ' (expected ' + m['top1_expected'] + ')'}")
    s = r["summary"]
    new = [m["browser_s"] for m in r["moves"] if m["kind"] == "new"]
    cached = [m["browser_s"] for m in r["moves"] if m["kind"] == "cached"]
    firsts = [m["first_s"] for m in r["moves"] if m["kind"] == "new"]
    over = [m["overhead_s"] for m in r["moves"] if m["kind"] == "new"]
    if new:
        out.append(f"new configurations ({len(new)}): browser median {statistics.median(new):.2f} s, p90 "
                   f"{_pct(new, 90):.2f} s; first visible change median {statistics.median(firsts):.2f} s, p90 "
                   f"{_pct(firsts, 90):.2f} s; page overhead median {statistics.median(over):.2f} s, p90 {_pct(over, 90):.2f} s")
    if cached:
        out.append(f"cached configurations ({len(cached)}): browser median {statistics.median(cached):.2f} s, p90 "
                   f"{_pct(cached, 90):.2f} s, max {max(cached):.2f} s")
    out.append(f"pause between moves {s['pause_s']:.1f} s; server peak RSS {s['server_peak_rss_mb']:.0f} MB; "
               f"server tracebacks: {len(s['server_tracebacks'])}; every headline as the engine computed: "
               f"{s['all_shown_as_expected']}")
    return "\n".join(out)


# ---------------------------------------------------------------- N sessions at once

def run_load(checkpoint: str | Path, data_root: str | None = None, sessions: int = 8, minutes: float = 3.0,
             seed: int = 0, pause_s: float = 1.0, timeout_s: float = 900, threads: int | None = None,
             server: AppServer | None = None, explorer=None) -> dict:
    """The load mode of the module doc: ``sessions`` browser contexts, each pressing random slider
    keys (``Home``/``End``/arrows on a random layer) for ``minutes``, ``pause_s`` after each answer.
    Then each session's final headline is checked against an independent Explorer's top-1 of the
    configuration its URL names. ``server`` / ``explorer`` as in :func:`run_moves`. Returns a
    JSON-ready dict."""
    checkpoint = Path(checkpoint)
    with _serving(server, checkpoint, data_root, threads) as server:
        stop_rss = threading.Event()
        samples: list[float] = []

        def sample():  # VmHWM is the peak; the samples show the course
            while not stop_rss.wait(1.0):
                samples.append(proc_rss_mb(server.proc.pid, "VmRSS"))

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        results = asyncio.run(_load_sessions(server, sessions, minutes, seed, pause_s, timeout_s))
        stop_rss.set()
        peak = server.peak_rss_mb()
        tracebacks = server.tracebacks()
    _log("independent evaluation of each session's final configuration")
    from ..clustering import ClusteringConfig
    from ..pipeline import with_app_defaults

    explorer = _load_explorer(checkpoint, data_root) if explorer is None else explorer
    for r in results:
        if r.get("final_query") is None:
            continue
        query = {k: v for k, v in r["final_query"].items() if k not in ("ckpt", "layer", "proj", "tab")}
        config, warns = ClusteringConfig.from_query(with_app_defaults(query))
        r["final_expected"] = _pct_text(explorer.run(config).evaluation.top1)
        r["final_ok"] = (r["final_expected"] == r["final_shown"] and not warns
                         and dict(config.active) == r["final_slider_ks"])  # its URL names its own sliders
    times = [t for r in results for t in r["times"]]
    return {
        "sessions": sessions, "minutes": minutes, "pause_s": pause_s, "moves": len(times),
        "p50_s": _pct(times, 50), "p90_s": _pct(times, 90),
        "per_session": [{k: v for k, v in r.items() if k != "times"} | {"p50_s": _pct(r["times"], 50),
                                                                          "p90_s": _pct(r["times"], 90)}
                        for r in results],
        "exceptions": sum(r["exceptions"] for r in results) + sum(1 for r in results if r.get("error")),
        "all_sessions_own_results": all(r.get("final_ok") for r in results),
        "server_peak_rss_mb": peak, "server_rss_samples_mb_max": max(samples, default=0.0),
        "rss_under_limit": peak < RSS_LIMIT_MB, "server_tracebacks": tracebacks,
    }


async def _load_sessions(server, sessions, minutes, seed, pause_s, timeout_s) -> list[dict]:
    from playwright.async_api import async_playwright

    async with async_playwright() as p:
        browser = await p.chromium.launch(executable_path=CHROMIUM, headless=True, args=BROWSER_ARGS)
        try:
            return list(await asyncio.gather(*(_load_session(browser, server, i, minutes, seed, pause_s, timeout_s)
                                               for i in range(sessions))))
        finally:
            await browser.close()


async def _load_session(browser, server, i, minutes, seed, pause_s, timeout_s) -> dict:
    from ..model import CONV_LAYERS

    rng = random.Random(seed * 1000 + i)
    ks = {l.name: l.filters for l in CONV_LAYERS}
    out = {"session": i, "times": [], "exceptions": 0}
    ctx = await browser.new_context(viewport={"width": 1400, "height": 900})
    page = await ctx.new_page()
    try:
        await _open(page, f"{server.url}/?ckpt={server.checkpoint.stem}", timeout_s * 1000)
        end = time.monotonic() + 60 * minutes
        while time.monotonic() < end:
            layer = rng.choice(CONV_LAYERS)
            top, k = layer.filters, ks[layer.name]
            key = rng.choice([x for x, ok in (("Home", k > 1), ("End", k < top), ("ArrowLeft", k > 1),
                                              ("ArrowRight", k < top)) if ok])
            k = {"Home": 1, "End": top, "ArrowLeft": k - 1, "ArrowRight": k + 1}[key]
            ks[layer.name] = k
            # Done when the URL names exactly the new k (no parameter at all when back to unchanged):
            # a substring test would take k.L=13 for k.L=1 and stop the clock before the page answered.
            t = await _move(page, layer.name, key, timeout_s * 1000, url_key=f"k.{layer.name}",
                            url_value=str(k) if k < top else None)
            out["times"].append(t["browser_s"])
            out["exceptions"] += await _exceptions(page)
            await asyncio.sleep(pause_s)
        await page.wait_for_function("() => !document.querySelector('[data-testid=\"stStatusWidget\"]')",
                                     timeout=timeout_s * 1000)
        from urllib.parse import parse_qs, urlparse

        out["final_query"] = {k: v for k, v in parse_qs(urlparse(page.url).query).items()}
        out["final_shown"] = (await _metric(page, "Pruned top-1").first.inner_text()).strip()
        out["final_slider_ks"] = {l.name: ks[l.name] for l in CONV_LAYERS if ks[l.name] < l.filters}
    except Exception as e:  # reported per session, the others go on
        out["error"] = f"{type(e).__name__}: {str(e)[:300]}"
    finally:
        await ctx.close()
    return out


def format_load(r: dict) -> str:
    out = [f"{r['sessions']} sessions x {r['minutes']:g} min ({r['moves']} moves, pause {r['pause_s']:g} s): "
           f"p50 {r['p50_s']:.2f} s, p90 {r['p90_s']:.2f} s per move"]
    for s in r["per_session"]:
        out.append(f"  session {s['session']}: {'error ' + s['error'] if s.get('error') else ''}p50 {s['p50_s']:.2f} s, "
                   f"p90 {s['p90_s']:.2f} s, final top-1 {s.get('final_shown')} (independent: "
                   f"{s.get('final_expected')}) {'ok' if s.get('final_ok') else 'MISMATCH'}")
    out.append(f"exceptions on pages: {r['exceptions']}; every session saw its own results: "
               f"{r['all_sessions_own_results']}; server tracebacks: {len(r['server_tracebacks'])}")
    out.append(f"server peak RSS {r['server_peak_rss_mb']:.0f} MB (limit {RSS_LIMIT_MB} MB: "
               f"{'under' if r['rss_under_limit'] else 'OVER'})")
    return "\n".join(out)
