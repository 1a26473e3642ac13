"""Smoke test of the browser benchmark (:mod:`explorer.analysis.browser_bench`, ``python -m
explorer.bench --browser``): a tiny run produces its table, and what each session was shown is what
the engine computes. Timings are never asserted (the benchmark measures them; docs/app.md).

Needs ``/usr/bin/chromium`` and the real test split; skipped without them, except under ``CI``."""
from __future__ import annotations

import os

import pytest

from explorer import checkpoints as ckpt
from explorer.analysis import browser_bench

from _apphelpers import stable_checkpoint_dir, unavailable

pytestmark = [pytest.mark.browser, pytest.mark.realdata]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, jpeg_root):
    if not os.path.exists(browser_bench.CHROMIUM):
        unavailable(f"{browser_bench.CHROMIUM} not found (apt-get install chromium)")
    return stable_checkpoint_dir(tmp_path_factory.mktemp("bench")) / f"{ckpt.DEFAULT_NAME}.pt"


@pytest.fixture(scope="module")
def shared(checkpoint, jpeg_root):
    """One server and one in-process Explorer for both smoke tests (each start costs tens of seconds)."""
    with browser_bench.AppServer(checkpoint, str(jpeg_root)) as server:
        yield server, browser_bench._load_explorer(checkpoint, str(jpeg_root))


def test_moves_table(checkpoint, jpeg_root, shared):
    server, explorer = shared
    r = browser_bench.run_moves(checkpoint, str(jpeg_root), layers=["layer3.2.conv2"], pause_s=0.2,
                                server=server, explorer=explorer)
    assert [(m["layer"], m["k"], m["kind"]) for m in r["moves"]] == [("layer3.2.conv2", 1, "new"),
                                                                   ("layer3.2.conv2", 64, "cached")]
    assert r["summary"]["all_shown_as_expected"] and not r["summary"]["server_tracebacks"]
    table = browser_bench.format_moves(r)
    assert "layer3.2.conv2 -> 1 " in table and "(cached)" in table and "server peak RSS" in table


def test_load_two_sessions(checkpoint, jpeg_root, shared):
    server, explorer = shared
    r = browser_bench.run_load(checkpoint, str(jpeg_root), sessions=2, minutes=0.2, pause_s=0.2,
                               server=server, explorer=explorer)
    assert r["exceptions"] == 0 and r["all_sessions_own_results"], r["per_session"]
    assert r["moves"] >= 2 and r["server_peak_rss_mb"] > 0 and not r["server_tracebacks"]
    assert "sessions x" in browser_bench.format_load(r)
