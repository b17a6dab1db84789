"""The examples' command lines: ``--help`` of every example, results folders never overwritten,
and the file names bilevel_ridge.py reports."""

from __future__ import annotations

import importlib.util
import re
import sys
from pathlib import Path
from types import ModuleType

import pytest

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


def test_quickstart_runs_and_prints_its_diagnostics(capsys: pytest.CaptureFixture[str]) -> None:
    assert _load("quickstart").main(["--seed", "0"]) == 0
    out = capsys.readouterr().out
    assert "converged 1024/1024" in out and "RobustPool('huber')" in out
