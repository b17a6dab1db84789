"""The wheel: ``python -m build --wheel`` builds it, and it installs and works in a fresh venv.

The wheel is built with ``--no-isolation`` (the build backend comes from this environment, so no
network is needed) from a copy of the files packaging reads (``pyproject.toml``, ``README.md``,
``LICENSE``, ``declopt/``), so that setuptools' ``build/`` and ``*.egg-info`` stay out of the
checkout. The venv is made with ``--system-site-packages``: torch, cvxpy and the other runtime
dependencies come from this environment (installing them would need the network and minutes),
and the wheel is installed with ``--no-deps --no-index``. (A venv's "system" site-packages are
those of the base interpreter, so when the tests run in a venv themselves, e.g. CI's, the fresh
venv would miss what that venv installed; then a ``.pth`` file in the fresh venv adds this
environment's site-packages after its own.) Its own copy of declopt shadows any
other install (an editable one included): the smoke test, run from a directory outside the
repository and without ``PYTHONPATH``, asserts that ``declopt`` is imported from the venv.
"""

from __future__ import annotations

import importlib.util
import os
import re
import shutil
import site
import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGED = ("pyproject.toml", "README.md", "LICENSE")
VERSION = re.search(
    r'^__version__ = "([^"]+)"', (ROOT / "declopt" / "__init__.py").read_text(), re.M
)[1]

SMOKE = f"""
import importlib.metadata, pathlib, sys

import cvxpy as cp
import torch

import declopt as dl
from declopt.torch import CvxpyLayer

package = pathlib.Path(dl.__file__).resolve().parent
assert package.is_relative_to(pathlib.Path(sys.prefix).resolve()), package
assert dl.__version__ == importlib.metadata.version("declopt") == {VERSION!r}, dl.__version__
assert (package / "py.typed").is_file()
assert callable(CvxpyLayer) and "torch" in dl.backends.available()

x, u = cp.Parameter(3), cp.Variable(3)
box = cp.Problem(cp.Minimize(0.5 * cp.sum_squares(u - x)), [u >= 0, u <= 1])
layer = dl.Layer(box, [x], [u], backend="torch")
X = torch.tensor([[1.5, 0.3, -2.0], [0.2, 0.4, 0.6]], dtype=torch.float64, requires_grad=True)
(U,) = layer(X)
U.sum().backward()
torch.testing.assert_close(U, X.detach().clamp(0, 1))
torch.testing.assert_close(X.grad, ((X > 0) & (X < 1)).double())
assert bool(layer.info.converged.all())
print("smoke ok", dl.__version__, package)
"""


# The fresh venv's site-packages, then its sys.path (system site-packages included), one a line.
PATHS = "import sys, sysconfig; print(sysconfig.get_path('purelib'), *sys.path, sep='\\n')"


def _run(command: list[str], cwd: Path, timeout: float = 120) -> str:
    """Run ``command`` without ``PYTHONPATH`` (which would put a checkout first); its output."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["PIP_DISABLE_PIP_VERSION_CHECK"] = "1"
    result = subprocess.run(
        command, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout
    )
    assert result.returncode == 0, f"{' '.join(command)} failed:\n{result.stdout}\n{result.stderr}"
    return result.stdout


def test_wheel_installs_in_a_fresh_venv_and_passes_a_smoke_test(tmp_path: Path) -> None:
    source = tmp_path / "source"
    source.mkdir()
    for name in PACKAGED:
        shutil.copy2(ROOT / name, source / name)
    shutil.copytree(
        ROOT / "declopt", source / "declopt", ignore=shutil.ignore_patterns("__pycache__")
    )
    dist = tmp_path / "dist"
    _run(
        [sys.executable, "-m", "build", "--wheel", "--no-isolation", "--outdir", str(dist)],
        cwd=source,
    )
    (wheel,) = dist.glob("*.whl")
    assert wheel.name == f"declopt-{VERSION}-py3-none-any.whl"
    names = zipfile.ZipFile(wheel).namelist()
    assert "declopt/py.typed" in names
    assert not [n for n in names if n.startswith(("tests/", "examples/", "benchmarks/"))]

    venv = tmp_path / "venv"
    # An interpreter without ensurepip (Debian's without python3-venv) gets a venv without pip,
    # into which this environment's pip installs (``pip --python``, pip >= 22.3).
    has_ensurepip = importlib.util.find_spec("ensurepip") is not None
    without_pip = [] if has_ensurepip else ["--without-pip"]
    _run(
        [sys.executable, "-m", "venv", "--system-site-packages", *without_pip, str(venv)],
        cwd=tmp_path,
    )
    python = venv / ("Scripts/python.exe" if os.name == "nt" else "bin/python")
    purelib, *venv_path = _run([str(python), "-c", PATHS], cwd=tmp_path).splitlines()
    seen = {Path(p).resolve() for p in venv_path if p}
    outer = [p for p in site.getsitepackages() if Path(p).resolve() not in seen]
    if outer:  # this environment is a venv itself: its site-packages after the fresh venv's
        (Path(purelib) / "_declopt_test_outer_env.pth").write_text(
            "".join(f"import site; site.addsitedir({p!r})\n" for p in outer)
        )
    pip = [str(python), "-m", "pip"] if has_ensurepip else [sys.executable, "-m", "pip"]
    pip += [] if has_ensurepip else ["--python", str(python)]
    _run([*pip, "install", "--quiet", "--no-deps", "--no-index", str(wheel)], cwd=tmp_path)
    outside = tmp_path / "elsewhere"  # not the checkout: `import declopt` must find the wheel's
    outside.mkdir()
    assert "smoke ok" in _run([str(python), "-c", SMOKE], cwd=outside)
