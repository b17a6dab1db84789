"""benchmarks/consumption.py (the seed paper's figure 6) on tiny sizes, and its memory measure.

Nothing here asserts on wall-clock time: only that every cell is measured, the numbers are
sensible (positive, finite, memory growing with n) and the CSV and the figure are written.
"""

from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import consumption  # noqa: E402
from _common import TensorPeak  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")


def test_tensor_peak_counts_what_is_alive_at_once() -> None:
    """Two 4 MB blocks alive together, then a third after one is freed: the peak is 8 MB, and
    a tensor made before the measured call (freed inside it) does not count."""
    before = torch.ones(1 << 20)

    def work() -> None:
        nonlocal before
        a = torch.ones(1 << 20)
        b = a * 2
        del a, before
        c = b + 1
        del b, c

    peak = TensorPeak().measure(work)
    assert peak is not None
    assert 8 * 2**20 <= peak < 8 * 2**20 + 4096


def test_consumption_tiny(tmp_path: Path) -> None:
    out, figure = tmp_path / "c.csv", tmp_path / "c.png"
    argv = ["--n", "16", "64", "--channels", "4", "--reps", "1", "--warmup", "0"]
    argv += ["--budget", "0", "--out", str(out), "--figure", str(figure)]
    rows = consumption.main(argv)

    assert figure.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert out.read_text().splitlines()[0].split(",") == consumption.COLUMNS
    written = consumption.read_csv(out)
    assert len(written) == len(rows)
    cells = {(r["layer"], r["penalty"]) for r in written}
    expected = {("floor", "mean"), ("floor", "max")}
    expected |= {(layer, p) for layer in consumption.LAYERS for p in consumption.PENALTIES}
    assert cells == expected
    assert len(written) == 2 * len(expected)  # every cell at both sizes (TQ is declared <= 256)
    for r in written:
        assert (r["batch"], r["channels"]) == (1, 4)
        assert r["reps"] == 1  # --reps 1 is honoured (the budget never cuts below it)
        for key in ("fwd_ms", "bwd_ms", "fwd_wall_ms", "bwd_wall_ms", "first_s"):
            assert math.isfinite(r[key]) and r[key] >= 0, (r, key)
        assert r["converged"], r
        # At least the gradient of x, 4 bytes per entry, is alive at the end of the backward.
        assert r["peak_mb"] * 2**20 >= 4 * 4 * r["n"], r
    by = {(r["layer"], r["penalty"], r["n"]): r["peak_mb"] for r in written}
    for layer, penalty in cells:  # pooling 4x the entries needs more memory, in every cell
        assert by[layer, penalty, 64] > by[layer, penalty, 16], (layer, penalty)

    table = consumption.tables(written)
    assert "| robust_pool | TQ |" in table and "| declared | W |" in table

    again = tmp_path / "again.png"
    consumption.main(["--replot", "--out", str(out), "--figure", str(again)])
    assert again.stat().st_size > 0


def test_declared_truncated_quadratic_is_capped(tmp_path: Path) -> None:
    """Above --declared-tq-max-n the declared truncated quadratic is left out (its dense kink
    systems grow as n^2), the other cells are measured."""
    argv = ["--n", "16", "--channels", "2", "--layers", "declared", "--reps", "1", "--warmup", "0"]
    argv += ["--penalties", "huber", "truncated_quadratic", "--declared-tq-max-n", "8"]
    argv += ["--no-memory", "--out", str(tmp_path / "c.csv")]
    rows = consumption.main(argv)
    assert {(r["layer"], r["penalty"]) for r in rows} == {
        ("floor", "mean"),
        ("floor", "max"),
        ("declared", "huber"),
    }
    assert all(r["peak_mb"] is None for r in rows)
