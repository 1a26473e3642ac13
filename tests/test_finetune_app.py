"""Fine-tuning from the app (issue 15, part 2): the checks that say why a configuration cannot be
fine-tuned, the detached launcher (one run of training or fine-tuning at a time), the Explorer
page's "Fine-tune" tab, the sidebar's progress of a run, and the result in the picker with its
compressed export downloadable.

The real fine-tuning run is one epoch on 40 synthetic images (``--synthetic``, about 15 s); the
app tests run on a tiny image folder (tests/test_user_failures.py), so nothing here needs the real
dataset."""
from __future__ import annotations

import io
import json
import os
import shutil
import time
import zipfile
from pathlib import Path

import pytest

from explorer import checkpoints as ckpt
from explorer.app import support as sup
from explorer.clustering import ClusteringConfig
from explorer.model import resnet20

from test_user_failures import P58, REPO, make_app, no_exception, p58_tiny_env, tiny_image_folder

TINY_RUN = ("--synthetic", "40", "--batch-size", "20", "--threads", "1", "--precision", "fp32", "--cutout", "0",
            "--rebase-images", "8")
CONFIG = ClusteringConfig(ks={"layer1.0.conv1": 4, "layer2.0.conv1": 8}, fold_bn=True)


def base_dir(d: Path, name: str = "base") -> Path:
    """A checkpoint directory holding one complete (random) ResNet20 ``name``."""
    d.mkdir(parents=True, exist_ok=True)
    ckpt.save_torch(resnet20().state_dict(), d / f"{name}.pt")
    ckpt.save_json({"architecture": "resnet20", "status": "complete", "test_top1": 0.1,
                    "dataset": {"name": "synthetic"}}, d / f"{name}.json")
    return d


def info_of(d: Path, name: str) -> ckpt.CheckpointInfo:
    return next(i for i in ckpt.list_checkpoints(d) if i.name == name)


def wait(rec: sup.LaunchRecord, limit_s: float = 300) -> None:
    deadline = time.time() + limit_s
    while rec.alive and time.time() < deadline:
        time.sleep(0.5)
    if rec.alive:
        os.killpg(rec.pid, 15)
    assert not rec.alive, sup.tail(rec.log, 20)


# ---------------------------------------------------------------- checks

def test_configurations_that_cannot_be_fine_tuned_say_why(tmp_path):
    d = base_dir(tmp_path / "ckpts")
    info = info_of(d, "base")
    model = ckpt.load_model(info.path)
    assert sup.finetune_problem(info, CONFIG, model) is None
    cases = [
        (info, ClusteringConfig(), "nothing is clustered"),
        (info, ClusteringConfig(ks={"conv1": 4}, granularity="kernel"), "kernel granularity cannot be fine-tuned"),
        (None, CONFIG, "uploaded checkpoint"),
    ]
    for i, cfg, needle in cases:
        problem = sup.finetune_problem(i, cfg, model)
        assert problem and needle in problem and "\n" not in problem, problem
    ckpt.save_json({"architecture": "resnet20", "status": "training", "epochs": 9}, d / "base.json")
    assert "incomplete" in sup.finetune_problem(info_of(d, "base"), CONFIG, model)
    p58 = REPO / "checkpoints" / f"{P58}.pt"
    if p58.is_file():
        problem = sup.finetune_problem(info, ClusteringConfig(ks={"layer1.0.conv1": 12}), ckpt.load_model(p58))
        assert "holds 9 distinct filters (of 16), so k = 12 cannot be clustered" in problem
    with pytest.raises(sup.LaunchError, match="cannot fine-tune: nothing is clustered"):
        sup.launch_finetune(info_of(base_dir(tmp_path / "b2"), "base"), ClusteringConfig(), "x_ft", 1,
                            ckpt_dir=tmp_path / "b2", logs=tmp_path / "logs")
    assert not (tmp_path / "logs" / "launch.json").exists()  # nothing started


# ---------------------------------------------------------------- the launcher, for real

@pytest.fixture(scope="module")
def finetuned(tmp_path_factory):
    """One real 1-epoch fine-tuning run started by the launcher (distilled, alpha 0.5), and what
    the launcher refused while it ran."""
    root = tmp_path_factory.mktemp("ft")
    d, logs = base_dir(root / "ckpts"), root / "logs"
    rec = sup.launch_finetune(info_of(d, "base"), CONFIG, "base_ft", 1, distill=0.5, temperature=3.0, lr=0.01,
                              ckpt_dir=d, logs=logs, extra_args=TINY_RUN)
    refused = []
    try:
        assert os.getsid(rec.pid) == rec.pid  # its own session: survives the server, never blocks it
        for start in (lambda: sup.launch_training("other", 1, 0, d, logs),
                      lambda: sup.launch_finetune(info_of(d, "base"), CONFIG, "base_ft_b", 1, ckpt_dir=d, logs=logs)):
            with pytest.raises(sup.LaunchError) as e:
                start()
            refused.append(str(e.value))
    finally:
        wait(rec)
    return d, logs, rec, refused


def test_launch_finetune_detached_one_at_a_time(finetuned):
    d, logs, rec, refused = finetuned
    assert all("already in progress" in r and "base_ft" in r for r in refused), refused
    assert rec.kind == "finetune" and sup.last_launch(logs) == rec and rec.what == "fine-tuning"
    assert "started from the app" in Path(rec.log).read_text()
    saved = ClusteringConfig.from_json((logs / "finetune-base_ft.config.json").read_text())
    assert saved == CONFIG and str(logs / "finetune-base_ft.config.json") in rec.cmd
    info = info_of(d, "base_ft")
    assert info.complete, sup.tail(rec.log, 20)
    hp = info.meta["finetune"]["hyperparameters"]
    assert (hp["epochs"], hp["distill"], hp["temperature"], hp["lr"]) == (1, 0.5, 3.0, 0.01)
    assert info.meta["finetune"]["base_checkpoint"] == "base" and info.meta["clustering"] == CONFIG.to_dict()
    assert sup.checkpoint_label(info).startswith("base_ft - ") and "top-1" in sup.checkpoint_label(info)
    files = sup.finetune_export(d, "base_ft")
    assert [p.name for p in files] == ["base_ft.pt", "base_ft.json", "base_ft.onnx"]
    with zipfile.ZipFile(io.BytesIO(sup.export_zip(files, "base_ft"))) as z:
        assert sorted(z.namelist()) == sorted(["base_ft.pt", "base_ft.json", "base_ft.onnx", "README.txt"])
    from explorer.compress import load_compressed

    load_compressed(files[0])
    with pytest.raises(sup.LaunchError, match="already exists"):
        sup.launch_finetune(info_of(d, "base"), CONFIG, "base_ft", 1, ckpt_dir=d, logs=logs)
    assert sup.default_finetune_name("base", d) == "base_ft2"


# ---------------------------------------------------------------- the app

@pytest.fixture
def app_dirs(monkeypatch, tmp_path):
    """Tiny data; the p58 fine-tuned checkpoint in a checkpoint directory of its own; training allowed."""
    return p58_tiny_env(monkeypatch, tmp_path, allow_training=True), tmp_path / "logs"


Q = {"ckpt": P58, "proj": "pca", "space": "weight", "recovery": "none", "tab": "finetune"}


def test_app_fine_tune_tab_starts_a_run_and_shows_how_it_ended(app_dirs):
    """The tab's form starts ``python -m explorer.finetune`` on the configuration on screen. On the
    tiny folder (20 training images) the run stops at once (batch 128 > 20 images), and the sidebar
    says so with the run's error line."""
    d, logs = app_dirs
    at = make_app({**Q, "k.layer3.2.conv2": "32", "fold_bn": "1"}).run()
    no_exception(at)
    assert at.text_input(key=f"ft.name.{P58}").value == f"{P58}_ft"
    at.radio(key="ft.method").set_value("distill")
    at.number_input(key="ft.epochs").set_value(2)
    at.button(key="ft.submit").click().run()
    no_exception(at)
    assert any(f"Started fine-tuning `{P58}_ft`" in s.value for s in at.success), [s.value for s in at.success]
    rec = sup.last_launch(logs)
    assert rec.kind == "finetune" and rec.name == f"{P58}_ft"
    args = rec.cmd[rec.cmd.index("-m") + 1:]
    assert args[0] == "explorer.finetune" and args[args.index("--epochs") + 1] == "2"
    assert args[args.index("--distill") + 1] == "0.7" and args[args.index("--checkpoint") + 1] == str(d / f"{P58}.pt")
    saved = ClusteringConfig.from_json(Path(args[args.index("--config") + 1]).read_text())
    assert saved.active == {"layer3.2.conv2": 32} and saved.fold_bn
    wait(rec, 240)
    at.run()
    no_exception(at)
    ended = [w.value for w in at.warning if "ended before finishing" in w.value]
    assert ended and "exceeds the 20 training images" in ended[0], [w.value for w in at.warning]


def test_app_fine_tune_tab_explains_what_cannot_be_fine_tuned(app_dirs, monkeypatch):
    at = make_app(Q).run()  # nothing clustered
    no_exception(at)
    assert any("cannot be fine-tuned: nothing is clustered" in e.value for e in at.error)
    at.slider(key="k.layer1.0.conv1").set_value(12).run()
    no_exception(at)
    assert any("cannot be fine-tuned: layer1.0.conv1 holds 9 distinct filters" in e.value for e in at.error)
    monkeypatch.setenv("EXPLORER_ALLOW_TRAINING", "0")
    off = make_app({**Q, "k.layer3.2.conv2": "32"}).run()
    no_exception(off)
    assert any("Disabled on this server" in c.value and "explorer.finetune" in c.value for c in off.caption)
    assert not [b for b in off.button if b.key == "ft.submit"]


def test_sidebar_shows_fine_tuning_progress_and_eta(app_dirs):
    """A run in its first epoch (a status file, no metadata yet) started from the app, as this
    process stands in for it: the sidebar shows its epoch, latest accuracy and ETA."""
    d, logs = app_dirs
    logs.mkdir(parents=True, exist_ok=True)
    rec = sup.LaunchRecord(os.getpid(), "p58_more", str(logs / "finetune-p58_more.log"), time.time(),
                           ["python", "-m", "explorer.finetune"], "finetune")
    ckpt.save_json(rec.__dict__, logs / "launch.json")
    ckpt.write_status(d / "p58_more.status.json", state="running", epoch=0.5, epochs=3, eta_seconds=3900,
                      test_top1=None, pid=os.getpid())
    at = make_app(Q).run()
    no_exception(at)
    assert any("p58_more** fine-tuning: epoch 0.5/3" in p.text for p in at.progress), [p.text for p in at.progress]
    assert any("ETA 1 h 05 min" in c.value for c in at.caption)
    assert "p58_more" in sup.running_training(d, logs)


def test_fine_tuned_result_is_in_the_picker_with_its_export(finetuned, monkeypatch, tmp_path):
    d, logs, rec, _ = finetuned
    monkeypatch.setenv("EXPLORER_CHECKPOINTS", str(d))
    monkeypatch.setenv("EXPLORER_DATA", str(tiny_image_folder(tmp_path / "tiny")))
    monkeypatch.setenv("EXPLORER_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("EXPLORER_LOG_DIR", str(tmp_path / "logs"))
    monkeypatch.setenv("EXPLORER_ENGINE_PRECISION", "fp32")
    at = make_app({"ckpt": "base_ft", "proj": "pca", "space": "weight", "recovery": "none", "tab": "downloads"}).run()
    no_exception(at)
    picker = at.selectbox(key="ckpt")
    assert picker.value == "base_ft" and any(o.startswith("base_ft - ") and "top-1" in o for o in picker.options)
    labels = [b.label for b in at.download_button]
    assert {"All files (.zip)", ".pt", ".json", ".onnx"} <= set(labels), labels
    # the fine-tuned layers hold only their k distinct filters, which their sliders name
    assert "k\u00a0≤\u00a04" in at.slider(key="k.layer1.0.conv1").label
    assert "k\u00a0≤\u00a08" in at.slider(key="k.layer2.0.conv1").label
