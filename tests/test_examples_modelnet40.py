"""examples/modelnet40.py: the HDF5 loader, the stand-in, outliers, PointNet, training, DDP."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
sys.path.insert(0, str(EXAMPLES))

import modelnet40 as mn  # noqa: E402
from common.shapes import SHAPES, random_cloud  # noqa: E402
from common.training import CheckpointError, load_checkpoint  # noqa: E402

TINY = ["--mlp", "8", "16", "--head", "16", "--num-points", "32", "--no-progress"]
"""A tiny PointNet on short clouds: the CLI runs in seconds."""


pytestmark = pytest.mark.usefixtures("one_thread")


def write_layout(folder: Path, n_train: int = 10, n_test: int = 4, points: int = 16) -> None:
    """Random clouds in the real layout: 5 train files, 2 test files, labels (N, 1) uint8."""
    rng = np.random.default_rng(0)
    folder.mkdir(parents=True, exist_ok=True)
    for split, n, files in (("train", n_train, 5), ("test", n_test, 2)):
        for i in range(files):
            data = rng.standard_normal((n, points, 3)).astype(np.float32)
            label = (np.arange(n) % 3 + i).astype(np.uint8).reshape(-1, 1)
            mn.write_h5(folder / f"ply_data_{split}{i}.h5", data, label)


# ------------------------------------------------------------------------------------------------
# Loader


def test_loader_reads_the_modelnet40_layout_in_file_order(tmp_path: Path) -> None:
    write_layout(tmp_path)
    data = mn.load_modelnet(tmp_path)
    assert data.train.points.shape == (50, 16, 3) and data.train.points.dtype == np.float32
    assert data.test.points.shape == (8, 16, 3)
    assert data.train.labels.shape == (50,) and data.train.labels.dtype == np.int64
    with h5py.File(tmp_path / "ply_data_train3.h5") as f:
        np.testing.assert_array_equal(data.train.points[30:40], f["data"][()])
        np.testing.assert_array_equal(data.train.labels[30:40], f["label"][()][:, 0])
    assert data.class_names == [str(i) for i in range(7)]  # no shape_names.txt: labels 0..6


def test_loader_orders_files_by_index_not_by_name(tmp_path: Path) -> None:
    write_layout(tmp_path)
    for i in range(5, 11):  # ply_data_train10.h5 sorts before ply_data_train2.h5 as a string
        mn.write_h5(tmp_path / f"ply_data_train{i}.h5", np.zeros((1, 16, 3)), np.array([[i]]))
    assert [p.name for p in mn.split_files(tmp_path, "train")][-2:] == [
        "ply_data_train9.h5",
        "ply_data_train10.h5",
    ]
    assert mn.load_modelnet(tmp_path).train.labels[-1] == 10


def test_loader_uses_shape_names_and_checks_labels_against_them(tmp_path: Path) -> None:
    write_layout(tmp_path)
    (tmp_path / "shape_names.txt").write_text("\n".join(f"c{i}" for i in range(7)) + "\n")
    assert mn.load_modelnet(tmp_path).class_names[-1] == "c6"
    (tmp_path / "shape_names.txt").write_text("a\nb\n")
    with pytest.raises(mn.DatasetError, match="names only 2 classes"):
        mn.load_modelnet(tmp_path)


@pytest.mark.parametrize(
    ("corrupt", "message"),
    [
        (lambda d: (d / "ply_data_train0.h5").write_text("not hdf5"), "not a readable HDF5"),
        (lambda d: _rewrite(d, label=None), "no dataset 'label'"),
        (lambda d: _rewrite(d, data=np.zeros((10, 16, 2), np.float32)), r"'data' has shape"),
        (lambda d: _rewrite(d, label=np.zeros((9, 1), np.uint8)), r"'label' has shape \(9, 1\)"),
        (lambda d: _rewrite(d, label=np.full((10, 1), -1.0)), "non-negative integers"),
        (lambda d: _rewrite(d, data=np.full((10, 16, 3), np.nan, np.float32)), "NaN"),
        (lambda d: [p.unlink() for p in d.glob("ply_data_test*.h5")], "no ply_data_test"),
    ],
    ids=["not-hdf5", "no-label", "bad-data-shape", "label-count", "label-dtype", "nan", "no-test"],
)
def test_malformed_files_give_clear_errors_naming_the_problem(
    tmp_path: Path, corrupt, message: str
) -> None:
    write_layout(tmp_path)
    corrupt(tmp_path)
    with pytest.raises(mn.DatasetError, match=message):
        mn.load_modelnet(tmp_path)


def _rewrite(folder: Path, data: np.ndarray | None = ..., label: np.ndarray | None = ...) -> None:
    """Replace ply_data_train0.h5 with one holding the given datasets (None: leave it out)."""
    path = folder / "ply_data_train0.h5"
    with h5py.File(path) as f:
        old = {"data": f["data"][()], "label": f["label"][()]}
    new = {
        "data": old["data"] if data is ... else data,
        "label": old["label"] if label is ... else label,
    }
    with h5py.File(path, "w") as f:
        for key, value in new.items():
            if value is not None:
                f.create_dataset(key, data=value)


def test_missing_folder_is_a_clear_error_and_a_cli_usage_error(tmp_path: Path, capsys) -> None:
    with pytest.raises(mn.DatasetError, match="does not exist"):
        mn.load_modelnet(tmp_path / "nowhere")
    with pytest.raises(mn.DatasetError, match="no ply_data_train"):
        mn.load_modelnet(tmp_path)
    with pytest.raises(SystemExit) as exit_info:
        mn.main(["--data-dir", str(tmp_path / "nowhere")])
    assert exit_info.value.code == 2
    assert "does not exist" in capsys.readouterr().err


def test_cli_reports_a_malformed_data_folder_and_exits(tmp_path: Path) -> None:
    (tmp_path / "ply_data_train0.h5").write_text("oops")
    with pytest.raises(SystemExit, match="not a readable HDF5 file"):
        mn.main(["--data-dir", str(tmp_path), "--out-dir", str(tmp_path / "out"), *TINY])


# ------------------------------------------------------------------------------------------------
# Stand-in and outliers


def test_standin_is_written_in_the_real_layout_with_balanced_classes(tmp_path: Path) -> None:
    settings = mn.StandIn(classes=4, train_per_class=5, test_per_class=3, points=64)
    mn.generate_standin(tmp_path, settings)
    names = sorted(p.name for p in tmp_path.glob("ply_data_*.h5"))
    assert names == [f"ply_data_test{i}.h5" for i in range(2)] + [
        f"ply_data_train{i}.h5" for i in range(5)
    ]
    with h5py.File(tmp_path / "ply_data_train0.h5") as f:
        assert f["data"].dtype == np.float32 and f["data"].shape[1:] == (64, 3)
        assert f["label"].shape[1] == 1
    data = mn.load_modelnet(tmp_path)
    assert data.class_names == list(SHAPES)[:4]
    assert np.bincount(data.train.labels).tolist() == [5] * 4
    assert np.bincount(data.test.labels).tolist() == [3] * 4
    radii = np.linalg.norm(data.train.points, axis=-1)
    assert radii.max(axis=1) == pytest.approx(1.0, abs=1e-6)  # each cloud scaled to the unit ball
    assert np.abs(data.train.points.mean(axis=1)).max() < 1e-5  # and centred


def test_standin_is_reused_when_identical_and_regenerated_when_not(tmp_path: Path) -> None:
    small = mn.StandIn(classes=2, train_per_class=2, test_per_class=1, points=8)
    mn.ensure_standin(tmp_path, small)
    stamp = (tmp_path / "ply_data_train0.h5").stat().st_mtime_ns
    mn.ensure_standin(tmp_path, small)
    assert (tmp_path / "ply_data_train0.h5").stat().st_mtime_ns == stamp
    mn.ensure_standin(
        tmp_path, mn.StandIn(classes=3, train_per_class=2, test_per_class=1, points=8)
    )
    assert len(mn.load_modelnet(tmp_path).class_names) == 3


@pytest.mark.parametrize("shape", list(SHAPES))
def test_every_shape_samples_finite_points_in_the_unit_ball(shape: str) -> None:
    cloud = random_cloud(shape, np.random.default_rng(0), 300)
    assert cloud.shape == (300, 3) and np.isfinite(cloud).all()
    assert np.linalg.norm(cloud, axis=1).max() == pytest.approx(1.0)


def test_outliers_replace_the_given_fraction_with_points_in_the_unit_ball() -> None:
    rng = np.random.default_rng(0)
    clean = mn.PointClouds(rng.uniform(5, 6, (6, 40, 3)).astype(np.float32), np.arange(6))
    noisy = mn.add_outliers(clean, 0.25, seed=1)
    changed = (noisy.points != clean.points).any(-1)
    assert changed.sum(1).tolist() == [10] * 6  # exactly floor(0.25 * 40) per cloud
    assert np.linalg.norm(noisy.points[changed], axis=-1).max() <= 1.0
    np.testing.assert_array_equal(mn.add_outliers(clean, 0.25, seed=1).points, noisy.points)
    np.testing.assert_array_equal(mn.add_outliers(clean, 0.0, seed=1).points, clean.points)
    assert clean.points.min() >= 5  # the input is not modified


# ------------------------------------------------------------------------------------------------
# Model


@pytest.mark.parametrize("pooling", mn.POOLINGS)
def test_pointnet_maps_clouds_to_logits_and_trains_through_every_pooling(pooling: str) -> None:
    torch.manual_seed(0)
    model = mn.PointNet(5, mn.make_pooling(pooling), mlp=(8, 16), head=(16,))
    logits = model(torch.rand(4, 20, 3) * 2 - 1)
    assert logits.shape == (4, 5)
    logits.square().sum().backward()
    first = model.features[0].weight.grad
    assert first is not None and torch.isfinite(first).all() and first.abs().sum() > 0


def test_default_pointnet_has_the_paper_widths() -> None:
    model = mn.PointNet(40, mn.make_pooling("max"))
    convs = [m.out_channels for m in model.features if isinstance(m, torch.nn.Conv1d)]
    linears = [m.out_features for m in model.classifier if isinstance(m, torch.nn.Linear)]
    assert convs == [64, 64, 64, 128, 1024] and linears == [512, 256, 40]
    assert any(isinstance(m, torch.nn.Dropout) for m in model.classifier)


# ------------------------------------------------------------------------------------------------
# Training runs (tiny)


def tiny_args(out: Path, *extra: str) -> list[str]:
    return [
        "--out-dir", str(out), "--standin-classes", "3", "--standin-train", "8",
        "--standin-test", "4", "--batch-size", "6", "--lr", "0.05", *TINY, *extra,
    ]  # fmt: skip


def test_tiny_training_run_decreases_the_loss_and_writes_results(tmp_path: Path) -> None:
    results = mn.main(tiny_args(tmp_path, "--pooling", "huber", "--epochs", "4"))
    losses = [row["train_loss"] for row in results[0]["history"]]
    assert losses[-1] < losses[0]
    assert results[0]["history"][-1]["test_examples"] == 12
    for name in ("results.csv", "results.json", "table.md", "curves.png"):
        assert (tmp_path / name).is_file()
    assert "| huber |" in (tmp_path / "table.md").read_text()
    state = load_checkpoint(tmp_path / "huber_outliers0" / "checkpoint.pt")
    assert state["epoch"] == 4 and state["config"]["pooling"] == "huber"


def test_resume_continues_from_the_checkpoint_and_refuses_other_settings(tmp_path: Path) -> None:
    first = mn.main(tiny_args(tmp_path, "--epochs", "1"))[0]["history"]
    resumed = mn.main(tiny_args(tmp_path, "--epochs", "2", "--resume"))[0]["history"]
    assert len(resumed) == 2 and resumed[0] == first[0]
    with pytest.raises(CheckpointError, match=r"different settings.*alpha"):
        mn.main(tiny_args(tmp_path, "--epochs", "3", "--resume", "--alpha", "2"))
    (tmp_path / "max_outliers0" / "checkpoint.pt").write_bytes(b"truncated")
    with pytest.raises(CheckpointError, match="cannot read checkpoint"):
        mn.main(tiny_args(tmp_path, "--epochs", "3", "--resume"))


def test_two_process_torchrun_keeps_parameters_identical(tmp_path: Path) -> None:
    """DDP under torchrun with Gloo on the CPU: a few steps, then every rank compares its
    parameters with rank 0's (the run fails if they differ) and the metrics cover the whole
    test set exactly once."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    # The workers must use the launcher's store (below), not a port picked and released.
    env.pop("TORCH_DISABLE_SHARE_RDZV_TCP_STORE", None)
    # --standalone: the launcher's rendezvous store binds port 0 itself and hands the port it got
    # to the workers. The former --master_port from a _free_port() helper (bind port 0, close,
    # pass the number on) left a window in which another process -- a test session in another
    # checkout, say -- could take the port: the launcher then failed, or its workers joined the
    # other session's store and waited there.
    command = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
        str(EXAMPLES / "modelnet40.py"),
        *tiny_args(tmp_path, "--pooling", "huber", "--epochs", "1", "--max-steps", "3",
                   "--device", "cpu"),
    ]  # fmt: skip
    done = _run_group(command, env, timeout=120)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    run = json.loads((tmp_path / "results.json").read_text())["runs"][0]
    last = run["history"][-1]
    assert last["ranks_identical"] is True
    assert last["test_examples"] == 12  # 3 classes x 4 test clouds, sharded without padding
    assert "2 process(es)" in done.stdout


def _run_group(
    command: list[str], env: dict[str, str], timeout: float
) -> subprocess.CompletedProcess[str]:
    """``command`` in its own process group; if it outlives ``timeout``, it and every process it
    started are killed and the test fails.

    ``subprocess.run(timeout=...)`` kills only the launcher, and killing the launcher's process
    group is not enough either: torchrun starts each worker in a session of its own. A worker
    left behind keeps the output pipes open, so reading the launcher's output would then wait
    forever -- the test hung instead of failing. The workers are found as the launcher's
    descendants (from ``/proc``, where there is one) before anything is killed."""
    process = subprocess.Popen(
        command,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        stdout, stderr = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        for pid in [*_descendants(process.pid), process.pid]:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        try:
            stdout, stderr = process.communicate(timeout=10)
        except subprocess.TimeoutExpired:  # a grandchild we could not see still holds the pipes
            stdout, stderr = "", "(output lost: the pipes stayed open)"
        pytest.fail(f"torchrun did not finish in {timeout} s:\n{stdout[-2000:]}{stderr[-4000:]}")
    return subprocess.CompletedProcess(command, process.returncode, stdout, stderr)


def _descendants(pid: int) -> list[int]:
    """Every live descendant of ``pid`` (children first), read from ``/proc``; ``[]`` without
    it. A snapshot: processes are found by their parent links, so orphans are missed."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            # The command name (2nd field) is in parentheses and may hold spaces: split after it.
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):  # the process ended meanwhile
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    found, queue = [], list(children.get(pid, []))
    while queue:
        child = queue.pop(0)
        found.append(child)
        queue.extend(children.get(child, []))
    return found
