"""The README's headline figures, asserted exactly on the shipped checkpoints (real CIFAR-10 test
split, JPEG copy). Each figure belongs to one checkpoint file, named by its content hash: when a
checkpoint is retrained or replaced the test fails and says so, because the README (and this table)
must then be re-measured."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from explorer.data import CLASSES
from explorer.digest import digest

pytestmark = pytest.mark.realdata

REPO = Path(__file__).resolve().parent.parent
CKPT = REPO / "checkpoints"
# checkpoint file -> (sha256 of its bytes, the README's figures for it; for the nets measured from their
# compressed export, that file's sha256 too)
HEADLINE = {
    "resnet20_cifar10.pt": ("1bac31f722154c04d79186bdfa83691421230c28b2ebe91db1a64f0c0fb28a3d", {
        "baseline_top1": 0.8913,
        "k3": {"top1": 0.1002, "params": 18_955, "macs": 4_562_560, "baseline_params": 269_722,
               "baseline_macs": 40_551_040},
    }),
    "resnet20_cifar10_p58_kd_ft.pt": ("929d90b529990d7e13d4936d7cd81cb1d3b3fd310e73ab4e523acc67cf288932", {
        "top1": 0.8779, "macs": 23_814_784, "params": 159_888,
    }),
    "resnet20_cifar10_half_merged_ft.pt": ("34f3294412576623affbedf77df8c88fc5b286d6f6d0d3a2dc1700ad866a04de", {
        "top1": 0.8677, "macs": 20_497_024,
        "export_sha256": "0af3350db6e8ed404faed54fe543305e76ca8ad5bfaf95d06356fd62185a9155",
    }),
    "resnet20_cifar10_half_fpgm_ft.pt": ("4839a189919e48c0e597acbfb65000fb643b6ab2768c9779a614f22b2a7f8d8d", {
        "top1": 0.8748, "macs": 20_497_024,
        "export_sha256": "deb74bbfd2112dc0e62d4a8150816676f0787dfb985413c1335147bd52085aa6",
    }),
    "resnet20_cifar10_half_merged5_ft.pt": ("94bc8f281c24c927e1fe7d13ead07a1bac6cfa9c1962706b9bc4b3e3c6cccbf8", {
        "top1": 0.8494, "macs": 20_497_024,
        "export_sha256": "14df8d6758223e8037a83e31f293568ccd221841fe60230284f8b175838ccc0d",
    }),
    "resnet20_cifar10_half_centripetal5_ft.pt": ("4ae4f8716eff79226b34a6811bbd6f99c3e5dc1050f8af2f30d9176856571a1e", {
        "top1": 0.8461, "macs": 20_497_024,
        "export_sha256": "75222dc13b466038c048b88a6f1779725df131eefdd134cd5ca90e1efb2aef0a",
    }),
    "resnet20_cifar10_stream50_merged_ft.pt": ("b07d0562caa37f424f3815a638f475b6268b46821ccaca98b291fc586657c332", {
        "top1": 0.8702, "macs": 20_063_792,
        "export_sha256": "3c71cb37b7f9d77bab386e6a6de5390fc2fe021619e48bef605e7d747e6a0af7",
    }),
    "resnet20_cifar10_stream50_kd100_ft.pt": ("8be6267c138e1876b3ef61075e9a96dc155f12b0c327c77f6d9b3eb398925a53", {
        "top1": 0.8818, "macs": 20_063_792,
        "export_sha256": "26cc872b8f40360b317c206452c407906a0bfc5da4136e59b86d4266a5b18c16",
    }),
    "resnet20_cifar10_stream65_kd100_ft.pt": ("64edbd6c4ce5e37f2930095d774cf919d05d3f1680303c1aa9aa1b316044c38b", {
        "top1": 0.8721, "macs": 14_045_824,
        "export_sha256": "f8f1e33c734cbbb3a950b06af85799b77d5db715cb63022df6865b4a2c57fe7b",
    }),
}


def pinned(name: str) -> dict:
    """The README figures of checkpoint ``name``; fails when the file is not the one they were
    measured on."""
    path = CKPT / name
    if not path.is_file():
        pytest.fail(f"{path} is missing: it ships with the repository")
    want_sha, figures = HEADLINE[name]
    sha = digest(path.read_bytes(), algorithm="sha256")
    assert sha == want_sha, (f"{name} is not the checkpoint the README's figures were measured on (sha256 {sha}); "
                             f"re-measure them and update the README and tests/test_headline.py")
    return figures


def test_k3_everywhere_on_the_shipped_checkpoint(jpeg_root):
    """``python -m explorer.prune --k 3`` as the README shows it: 10.02% top-1, 18,955 unique
    parameters, 4,562,560 MACs (the first write-up's experiment falls to chance)."""
    want = pinned("resnet20_cifar10.pt")
    env = {**os.environ, "EXPLORER_DATA": str(jpeg_root), "OMP_NUM_THREADS": "1"}
    # ~70 s of CPU on an idle 2-core machine; EXPLORER_CLI_TIMEOUT raises the limit on a busy one.
    proc = subprocess.run([sys.executable, "-m", "explorer.prune", "--k", "3", "--json", "--threads", "1"],
                          cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=float(os.environ.get("EXPLORER_CLI_TIMEOUT", 300)))
    assert proc.returncode == 0, proc.stderr[-2000:]
    s = json.loads(proc.stdout)
    k3 = want["k3"]
    assert s["config"]["ks"] == {n: 3 for n in s["config"]["ks"]} and len(s["config"]["ks"]) == 19
    assert round(s["top1"], 4) == k3["top1"] and round(s["baseline_top1"], 4) == want["baseline_top1"]
    assert round(100 * s["top1_delta"], 2) == -79.11
    assert (s["params"], s["macs"]) == (k3["params"], k3["macs"])
    assert (s["baseline_params"], s["baseline_macs"]) == (k3["baseline_params"], k3["baseline_macs"])
    assert [r["class"] for r in s["per_class"]] == list(CLASSES)
    pruned = {r["class"]: r["pruned"] for r in s["per_class"]}
    assert pruned["horse"] == 1.0  # almost every image is called "horse"
    assert all(pruned[c] <= 0.002 for c in CLASSES if c != "horse")


def test_p58_fine_tuned_net(real_data):
    """The shipped p58 fine-tuned net re-clustered with its configuration finds exactly its
    clusters: 87.79% top-1 with 23,814,784 MACs (the last headline row)."""
    from explorer import ClusteringConfig, Explorer, load_model

    want = pinned("resnet20_cifar10_p58_kd_ft.pt")
    config = ClusteringConfig.from_json((CKPT / "resnet20_cifar10_p58_kd_ft.config.json").read_text())
    explorer = Explorer(load_model(CKPT / "resnet20_cifar10_p58_kd_ft.pt"), real_data, "resnet20_cifar10_p58_kd_ft")
    r = explorer.run(config)
    assert round(r.evaluation.top1, 4) == want["top1"]
    assert (r.compression.macs, r.compression.params) == (want["macs"], want["params"])


def test_stream_net_clustered_as_it_was_fine_tuned(real_data):
    """The app's "Cluster it as it was fine-tuned" on the residual-stream net (explorer.limits.
    tied_config): exactly the shipped export's top-1 and MACs, and its unique parameters."""
    from explorer import Explorer, load_model
    from explorer.limits import tied_config

    name = "resnet20_cifar10_stream50_merged_ft"
    want = pinned(f"{name}.pt")
    model = load_model(CKPT / f"{name}.pt")
    r = Explorer(model, real_data, name).run(tied_config(model))
    assert round(r.evaluation.top1, 4) == want["top1"]
    assert (r.compression.macs, r.compression.params) == (want["macs"], 151_652)


@pytest.mark.parametrize("name", ["resnet20_cifar10_half_merged_ft", "resnet20_cifar10_half_fpgm_ft",
                                  "resnet20_cifar10_half_merged5_ft", "resnet20_cifar10_half_centripetal5_ft",
                                  "resnet20_cifar10_stream50_merged_ft", "resnet20_cifar10_stream50_kd100_ft",
                                  "resnet20_cifar10_stream65_kd100_ft"])
def test_half_point_comparison_nets(real_data, name):
    """Clustering vs pruning after the same 30 epochs at 49.5% fewer MACs (and clustering with
    residual streams at 50.5% and 65.4%), and merged vs centripetal fine-tuning after the same 5 (the README's
    comparisons): each shipped export, evaluated in fp32 on the test split, gives its row's top-1
    and MACs."""
    from explorer.analysis.latency import load_export
    from explorer.compress import count_macs
    from explorer.evaluate import evaluate

    want = pinned(f"{name}.pt")
    export = CKPT / "compressed" / f"{name}.pt"
    sha = digest(export.read_bytes(), algorithm="sha256")
    assert sha == want["export_sha256"], (f"{export} is not the export the README's figures were measured on "
                                          f"(sha256 {sha}); re-measure and update tests/test_headline.py")
    net = load_export(export)
    assert round(evaluate(net, real_data.test_images, real_data.test_labels).top1, 4) == want["top1"]
    assert count_macs(net) == want["macs"]
