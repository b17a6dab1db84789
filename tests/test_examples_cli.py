"""The examples' command lines: ``--help`` of every example, results folders never overwritten,
and the file names bilevel_ridge.py reports."""

from __future__ import annotations

import importlib.util
import json
import re
import sys
from pathlib import Path
from types import ModuleType

import pytest
import torch

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
sys.path.insert(0, str(EXAMPLES))

pytestmark = pytest.mark.usefixtures("one_thread")


def _load(name: str) -> ModuleType:
    """An example as a module (by path: ``examples/`` is not a package)."""
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses resolve their module by name while executing
    spec.loader.exec_module(module)
    return module


EXAMPLE_NAMES = ("quickstart", "bilevel_ridge", "modelnet40", "imagenet")


def _help(name: str, capsys: pytest.CaptureFixture[str]) -> str:
    with pytest.raises(SystemExit) as exit_info:
        _load(name).main(["--help"])
    assert exit_info.value.code == 0
    return capsys.readouterr().out


def _options(help_text: str) -> dict[str, str]:
    """Each option's entry of a ``--help`` page (continuation lines joined), by its flag."""
    entries: dict[str, str] = {}
    flag = None
    for line in help_text.splitlines():
        match = re.match(r"^  (-[-\w]+)", line)
        if match:
            flag = match.group(1)
            entries[flag] = line.strip()
        elif flag is not None and line.startswith("    "):
            entries[flag] += " " + line.strip()
        else:
            flag = None
    return entries


@pytest.mark.parametrize("name", EXAMPLE_NAMES)
def test_help_exits_cleanly_and_states_every_default_once(
    name: str, capsys: pytest.CaptureFixture[str]
) -> None:
    text = _help(name, capsys)
    assert "(default: None)" not in text and "default: False" not in text
    options = _options(text)
    assert len(options) >= 2  # --help and at least one real option
    for flag, entry in options.items():
        assert entry.count("default") <= 1, f"{name} {flag}: {entry}"


@pytest.mark.parametrize("name", ["modelnet40", "imagenet"])
def test_help_states_the_defaults_the_training_examples_use(
    name: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """What ``--help`` says a flag defaults to (plain and under ``--quick``) is what the example
    then runs with: the help is written from the same tables, so it cannot drift from them (it
    had: ``--standin-per-class`` claimed ``--quick: 20`` after QUICK became 60)."""
    example = _load(name)
    options = _options(_help(name, capsys))
    show = example.cli.show
    plain, quick = example.parse_args([]), example.parse_args(["--quick"])
    for key in example.FULL.keys() | example.QUICK.keys():
        entry = options[f"--{key.replace('_', '-')}"]
        if example.FULL.get(key) is not None:
            assert f"default: {show(example.FULL[key])}" in entry, entry
            assert getattr(plain, key) == example.FULL[key], key
        if key in example.QUICK and example.QUICK[key] != example.FULL.get(key):
            assert f"--quick: {show(example.QUICK[key])}" in entry, entry
        if key in example.QUICK:
            assert getattr(quick, key) == example.QUICK[key], key


def test_quickstart_runs_and_prints_its_diagnostics(capsys: pytest.CaptureFixture[str]) -> None:
    assert _load("quickstart").main(["--seed", "0"]) == 0
    out = capsys.readouterr().out
    assert "converged 1024/1024" in out and "RobustPool('huber')" in out


# ------------------------------------------------------------------------------------------------
# Results folders


BILEVEL = ["--dataset", "iris", "--method", "secant", "--mu0", "800", "--max-iter", "1", "--quiet"]
"""One secant step on iris: the bilevel CLI in well under a second."""

POINTNET = [
    "--standin-classes", "2", "--standin-train", "2", "--standin-test", "1", "--batch-size", "2",
    "--mlp", "4", "8", "--head", "8", "--num-points", "16", "--epochs", "1", "--no-progress",
]  # fmt: skip
"""A PointNet of a few hundred weights on four clouds: the training CLI in about a second."""


def _stamps(folder: Path) -> dict[str, int]:
    """Every file under ``folder`` (relative name) with its modification time."""
    return {
        str(p.relative_to(folder)): p.stat().st_mtime_ns for p in folder.rglob("*") if p.is_file()
    }


def test_bilevel_ridge_prints_the_files_it_wrote(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    br = _load("bilevel_ridge")
    assert br.main([*BILEVEL, "--dataset", "iris", "diabetes", "--out", str(tmp_path)]) == 0
    wrote = capsys.readouterr().out.strip().splitlines()[-1]
    assert wrote.startswith("wrote ") and "<" not in wrote
    named = [Path(p) for p in wrote.removeprefix("wrote ").split(", ")]
    expected = ["results.md", "bilevel_ridge_iris.png", "bilevel_ridge_diabetes.png"]
    assert named == [tmp_path / name for name in expected]
    assert all(p.is_file() for p in named)


def test_bilevel_ridge_never_overwrites_an_earlier_run(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    br = _load("bilevel_ridge")
    monkeypatch.chdir(tmp_path)
    assert br.main(BILEVEL) == 0 and br.main(BILEVEL) == 0  # default: a new folder per run
    first, second = tmp_path / "runs/bilevel_ridge/run-001", tmp_path / "runs/bilevel_ridge/run-002"
    assert (first / "results.md").is_file() and (second / "results.md").is_file()
    assert f"wrote {Path('runs/bilevel_ridge/run-002/results.md')}" in capsys.readouterr().out
    before = _stamps(first)
    with pytest.raises(SystemExit, match="already holds the results of an earlier run"):
        br.main([*BILEVEL, "--out", str(first)])  # refused before any computing
    assert _stamps(first) == before
    (first / "bilevel_ridge_diabetes.png").write_bytes(b"stale")  # from an earlier, wider run
    assert br.main([*BILEVEL, "--out", str(first), "--overwrite"]) == 0
    assert not (first / "bilevel_ridge_diabetes.png").exists()  # replaced: nothing stale left
    assert (first / "results.md").stat().st_mtime_ns > before["results.md"]


def test_training_examples_never_overwrite_an_earlier_run(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    mn = _load("modelnet40")
    monkeypatch.chdir(tmp_path)
    mn.main(POINTNET)
    mn.main(POINTNET)
    root = tmp_path / "runs/modelnet40"
    first, second = root / "run-001", root / "run-002"
    for folder in (first, second):
        assert (folder / "results.json").is_file()
        assert (folder / "max_outliers0" / "checkpoint.pt").is_file()
    # The stand-in is generated once, shared by the runs; other settings get a folder of their own.
    (cache,) = (root / "standin").iterdir()
    assert (cache / "standin.txt").is_file()
    before_cache = (cache / "standin.txt").stat().st_mtime_ns
    assert f"results folder: {Path('runs/modelnet40/run-002')}" in capsys.readouterr().out
    before = _stamps(first)
    with pytest.raises(SystemExit, match=r"earlier run.*--overwrite.*--resume"):
        mn.main([*POINTNET, "--out-dir", str(first)])
    assert _stamps(first) == before
    # --resume without --out-dir continues the latest run, in place.
    resumed = mn.main([*POINTNET, "--resume", "--epochs", "2"])
    assert len(resumed[0]["history"]) == 2 and not (root / "run-003").exists()
    assert len(json.loads((second / "results.json").read_text())["runs"][0]["history"]) == 2
    assert _stamps(first) == before
    mn.main([*POINTNET, "--out-dir", str(first), "--overwrite", "--pooling", "huber"])
    mn.main([*POINTNET, "--standin-train", "3"])  # other stand-in settings: the cache is kept
    assert cache in (root / "standin").iterdir() and len(list((root / "standin").iterdir())) == 2
    assert (cache / "standin.txt").stat().st_mtime_ns == before_cache
    assert not (first / "max_outliers0" / "checkpoint.pt").exists()  # no stale run mixed in
    assert (first / "huber_outliers0" / "checkpoint.pt").is_file()


def test_imagenet_refuses_a_folder_holding_an_earlier_run_before_any_work(tmp_path: Path) -> None:
    """The same guard as modelnet40's (shared code), checked before data or models are built."""
    inet = _load("imagenet")
    (tmp_path / "none").mkdir()
    (tmp_path / "none" / "checkpoint.pt").write_bytes(b"earlier")
    (tmp_path / "table.md").write_text("earlier\n")
    before = _stamps(tmp_path)
    with pytest.raises(SystemExit, match=r"earlier run.*--overwrite.*--resume"):
        inet.main(["--quick", "--out-dir", str(tmp_path), "--no-progress"])
    assert _stamps(tmp_path) == before and not (tmp_path / "standin").exists()


def test_session_threads_last_as_long_as_the_session() -> None:
    """``--threads`` (``imagenet.py --quick``: 1) applies inside the run only: ``main()`` called
    from a notebook or a test leaves the caller's setting as it was."""
    cli = _load("imagenet").cli
    threads = torch.get_num_threads()
    with cli.session("cpu", threads=threads + 1):
        assert torch.get_num_threads() == threads + 1
    assert torch.get_num_threads() == threads
