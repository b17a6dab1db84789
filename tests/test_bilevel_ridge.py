"""examples/bilevel_ridge.py: the hypergradient, both upper-level methods, backends and the CLI."""

from __future__ import annotations

import importlib.util
import sys
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest
from sklearn.linear_model import Ridge
from sklearn.model_selection import KFold

import declopt as dl

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "bilevel_ridge.py"


def _load_example() -> ModuleType:
    spec = importlib.util.spec_from_file_location("bilevel_ridge", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses resolve their module by name while executing
    spec.loader.exec_module(module)
    return module


br = _load_example()


pytestmark = pytest.mark.usefixtures("one_thread")


@dataclass
class Case:
    name: str
    folds: br.Folds
    reference: br.Reference
    oracle: br.Hypergradient


def _case(protocol: br.Protocol, backend: str = "torch") -> Case:
    folds = br.make_folds(*br.load_dataset(protocol.dataset), protocol)
    oracle = br.Hypergradient(folds, backend=backend)
    return Case(protocol.dataset, folds, br.brute_force(folds), oracle)


@pytest.fixture(scope="module", params=br.DATASETS)
def paper_case(request: pytest.FixtureRequest) -> Case:
    """The default (paper-reproducing) protocol on each data set, torch backend."""
    return _case(br.Protocol(request.param))


def test_ridge_declaration_is_dpp_with_and_without_intercept() -> None:
    for penalised in (4, 3):
        problem, _, _ = br.ridge_problem(n_train=7, d=4, penalised=penalised)
        assert problem.is_dcp() and problem.is_dpp()


def test_padded_folds_with_intercept_match_sklearn_ridge_fold_by_fold() -> None:
    protocol = br.Protocol("diabetes", folds=5, shuffle=True, intercept=True)
    X, y = br.load_dataset("diabetes")
    folds = br.make_folds(X, y, protocol)
    assert len({int((folds.y_train[k] != 0).sum()) for k in range(5)}) == 2  # unequal folds
    mu = 7.0
    beta = br.ridge_numpy(folds, np.array(mu)) * folds.target_scale  # (K, p + 1), intercept last
    splits = KFold(5, shuffle=True, random_state=protocol.seed).split(X)
    for k, (train, _) in enumerate(splits):
        model = Ridge(alpha=mu).fit(X[train], y[train])  # same minimiser: 0.5 * both terms
        np.testing.assert_allclose(beta[k, :-1], model.coef_, rtol=1e-9, atol=1e-9)
        np.testing.assert_allclose(beta[k, -1], model.intercept_, rtol=1e-9)


PROTOCOLS = [
    br.Protocol("iris"),
    br.Protocol("diabetes"),
    br.Protocol("diabetes", folds=4, shuffle=True, intercept=True),
]
PROTOCOL_IDS = ["iris", "diabetes", "diabetes-shuffled-intercept"]


@pytest.mark.parametrize("protocol", PROTOCOLS, ids=PROTOCOL_IDS)
def test_layer_hypergradient_matches_central_difference_of_numpy_cv(
    protocol: br.Protocol,
) -> None:
    case = _case(protocol)
    for mu in (0.1, 3.0, 30.0, 800.0):
        cv, grad = case.oracle(mu)
        h = 1e-4 * mu  # relative step: truncation error ~1e-8 relative, rounding far below it
        cv_plus, cv_minus = br.cv_numpy(case.folds, np.array([mu + h, mu - h]))
        assert cv == pytest.approx(float(br.cv_numpy(case.folds, mu)), rel=1e-10)
        assert grad == pytest.approx((cv_plus - cv_minus) / (2 * h), rel=1e-6)


@pytest.mark.parametrize("protocol", PROTOCOLS, ids=PROTOCOL_IDS)
def test_layer_hypergradient_vanishes_at_the_brute_force_optimum(protocol: br.Protocol) -> None:
    case = _case(protocol)
    mu = case.reference.mu
    cv, grad = case.oracle(mu)
    # dCV/dlog mu relative to CV: the brute force locates mu* to ~1e-7 (function values only).
    assert br.stationarity(mu, cv, grad) < 1e-7
    assert cv == pytest.approx(case.reference.cv, rel=1e-12)


@pytest.mark.parametrize("mu0", [0.1, 800.0])
def test_secant_reaches_brute_force_optimum_within_30_iterations(
    paper_case: Case, mu0: float
) -> None:
    trace = br.secant_log_mu(paper_case.oracle, mu0, tol=1e-9, max_iter=30)
    assert trace.converged
    assert trace.iterations <= 30
    assert trace.mu[-1] == pytest.approx(paper_case.reference.mu, rel=1e-4)
    assert trace.cv[-1] == pytest.approx(paper_case.reference.cv, rel=1e-10)


def test_brute_force_optimum_is_interior_and_matches_the_paper_protocol(paper_case: Case) -> None:
    ref = paper_case.reference
    assert not ref.on_grid_edge and ref.curvature > 0
    # The default protocol was chosen because it lands on the paper's optima (examples/README.md).
    expected = {"iris": (345.27, 0.719462), "diabetes": (210.116, 13609.2)}
    mu, cv = expected[paper_case.name]
    assert ref.mu == pytest.approx(mu, rel=1e-5)
    assert ref.cv == pytest.approx(cv, rel=1e-5)


@pytest.mark.parametrize("mu0", [0.1, 800.0])
def test_gradient_descent_decreases_cv_monotonically_towards_the_optimum(
    paper_case: Case, mu0: float
) -> None:
    trace = br.gradient_descent(paper_case.oracle, mu0, step=0.1, tol=1e-9, max_iter=100)
    assert trace.iterations == 100  # the paper's step is far too small to converge here
    assert np.all(np.diff(trace.cv) < 0)
    direction = np.sign(paper_case.reference.mu - mu0)
    assert np.all(np.sign(np.diff(trace.mu)) == direction)
    no_overshoot = np.sign(paper_case.reference.mu - np.array(trace.mu)) == direction
    assert np.all(no_overshoot)


@pytest.mark.skipif(
    "cvxpylayers" not in dl.backends.available(), reason="the cvxpylayers backend is not registered"
)
@pytest.mark.parametrize("dataset", br.DATASETS)
def test_torch_and_cvxpylayers_backends_give_the_same_optimum(dataset: str) -> None:
    protocol = br.Protocol(dataset)
    mus = []
    for backend in ("torch", "cvxpylayers", "cone"):
        case = _case(protocol, backend)
        trace = br.secant_log_mu(case.oracle, 800.0, tol=1e-9, max_iter=30)
        assert trace.iterations <= 30
        mus.append(trace.mu[-1])
    # The conic solver's tolerance limits the cvxpylayers hypergradient (~1e-8 relative); the
    # cone backend's polished solutions are exact.
    assert mus[1] == pytest.approx(mus[0], rel=1e-5)
    assert mus[2] == pytest.approx(mus[0], rel=1e-8)


def test_cli_writes_the_table_and_one_figure_per_data_set(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code = br.main(["--max-iter", "2", "--out", str(tmp_path), "--quiet"])
    assert code == 0
    table = (tmp_path / "results.md").read_text()
    for name in br.DATASETS:
        png = tmp_path / f"bilevel_ridge_{name}.png"
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        for row in (f"| {name} | gd | 0.1 | 2 |", f"| {name} | secant | 800 | 2 |"):
            assert row in table
        assert f"| {name} | brute force (numpy) |" in table
    assert "contiguous" in table and "no intercept" in table  # the protocol is stated
    assert "| iris | secant |" in capsys.readouterr().out


def test_cli_refuses_an_unregistered_backend_clearly(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(dl.backends, "available", lambda: ["torch"])
    code = br.main(["--backend", "cvxpylayers", "--out", str(tmp_path / "out"), "--quiet"])
    assert code != 0
    assert "'cvxpylayers' is not registered" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
