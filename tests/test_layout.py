"""The layout the README describes: which modules may import what, short ``--help`` for every
command, the public API, and the README's notebook example (run as written, on the real data)."""
from __future__ import annotations

import ast
import importlib
import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
PKG = REPO / "explorer"
COMMANDS = ("train", "prune", "bench", "sensitivity", "search", "finetune", "report", "baselines")


def _imports(path: Path) -> set[str]:
    """Absolute names of the modules ``path`` imports (relative imports resolved)."""
    tree = ast.parse(path.read_text())
    package = ".".join(path.relative_to(REPO).with_suffix("").parts[:-1])
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module
            out.add(mod)
            out |= {f"{mod}.{a.name}" for a in node.names}
    return out


def _modules():
    return {p: _imports(p) for p in PKG.rglob("*.py")}


def _part(path: Path) -> str:
    """core, training, analysis, app, cli, or entry (a top-level thin entry point of a command)."""
    rel = path.relative_to(PKG).parts
    if len(rel) == 1:
        return "entry" if path.stem in COMMANDS else "core"
    return rel[0]


def test_every_command_has_its_entry_point():
    for command in COMMANDS:
        entry = PKG / f"{command}.py"
        assert entry.is_file(), f"python -m explorer.{command} needs {entry.relative_to(REPO)}"
        assert {n for n in _imports(entry) if n.startswith("explorer")} == {f"explorer.cli.{command}",
                                                                             f"explorer.cli.{command}.main"}


def test_layers_import_downwards_only():
    """core <- training <- analysis <- cli / app: the core library imports neither argparse nor
    Streamlit nor anything above it; only the app imports Streamlit; nothing but the thin entry
    points imports a command-line module."""
    above = {"core": ("explorer.training", "explorer.analysis", "explorer.app", "explorer.cli"),
             "training": ("explorer.analysis", "explorer.app", "explorer.cli"),
             "analysis": ("explorer.app", "explorer.cli"),
             "app": ("explorer.cli",), "cli": ("explorer.app",), "entry": ()}
    for path, names in _modules().items():
        part = _part(path)
        where = path.relative_to(REPO)
        for name in names:
            assert not name.startswith(above[part]), f"{where} ({part}) imports {name}"
            if name.startswith("explorer.cli"):
                assert part in ("entry", "cli"), f"{where} imports the command-line module {name}"
            if part != "app":
                assert not name.startswith("streamlit"), f"{where} imports Streamlit"
            if part in ("core", "training", "analysis", "app"):
                assert name != "argparse", f"{where} imports argparse"


@pytest.mark.parametrize("command", COMMANDS)
def test_help_is_short_with_examples(command, capsys):
    main = importlib.import_module(f"explorer.{command}").main
    with pytest.raises(SystemExit) as e:
        main(["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith(f"usage: python -m explorer.{command} ")
    description = out.split("\n\n")[1].strip().splitlines()  # the paragraph after the usage
    assert 1 <= len(description) <= 2, description
    assert "\nexamples:\n" in out and f"  python -m explorer.{command}" in out.split("\nexamples:\n")[1]


def test_public_api():
    import explorer

    for name in explorer.__all__:
        assert getattr(explorer, name) is not None, name
    from explorer.clustering import ClusteringConfig
    from explorer.pipeline import Explorer

    assert explorer.ClusteringConfig is ClusteringConfig and explorer.Explorer is Explorer
    with pytest.raises(AttributeError):
        explorer.no_such_name  # noqa: B018


def readme_example() -> str:
    text = (REPO / "README.md").read_text()
    m = re.search(r"## Use it from Python\n.*?```python\n(.*?)```", text, re.S)
    assert m, "README: no python block under '## Use it from Python'"
    return m.group(1)


@pytest.mark.realdata
def test_readme_example_runs_as_written(jpeg_root, monkeypatch, capsys):
    monkeypatch.setenv("EXPLORER_DATA", str(jpeg_root))
    monkeypatch.chdir(REPO)
    exec(compile(readme_example(), "README.md", "exec"), {})
    out = capsys.readouterr().out
    assert re.search(r"top-1 \d+\.\d+%", out), out
