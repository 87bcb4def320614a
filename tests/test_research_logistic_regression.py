"""End-to-end: research.logistic_regression on its smoke config, bars asserted on the outputs."""

import json

import pytest

from research import logistic_regression
from research.common import NonFiniteLossError, get_config

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("logistic_regression")
    config = get_config("logistic_regression", "smoke")
    return logistic_regression.run(config, workdir), workdir


def test_writes_every_output(run):
    _, workdir = run
    for name in ("config.json", "metrics.json", "metrics.jsonl", "tables.md", "convergence.png"):
        assert (workdir / name).stat().st_size > 0, name
    lines = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    assert {line["solver"] for line in lines} == {"adam", "lbfgs", "newton"}
    assert json.loads((workdir / "config.json").read_text())["C"] == 1.0
    assert json.loads((workdir / "metrics.json").read_text())["all_bars_met"] is True


@pytest.mark.parametrize("solver", ["lbfgs", "newton"])
def test_reaches_sklearn_objective(run, solver):
    row = run[0]["solvers"][solver]
    assert abs(row["rel_gap"]) <= 1e-6
    assert row["meets_bar"] is True
    assert row["coef_max_abs_diff"] < 1e-3
    assert row["test_accuracy"] == pytest.approx(row["sklearn_test_accuracy"], abs=0.01)


def test_xent_objective_matches_independent_formula(run):
    for row in run[0]["solvers"].values():
        assert row["xent_vs_numpy_rel"] < 1e-12


def test_first_order_solver_makes_progress(run):
    row = run[0]["solvers"]["adam"]
    assert 0 <= row["rel_gap"] < 0.05
    assert row["test_accuracy"] > 0.9


def test_non_finite_loss_stops_with_clear_error_and_keeps_outputs(tmp_path):
    config = get_config("logistic_regression", "smoke")
    config.optimizer = "sgd"
    config.solvers = ("sgd",)
    config.schedule = "constant"
    config.learning_rate = 1e300
    with pytest.raises(NonFiniteLossError, match=r"sgd: loss became (inf|nan) at step \d+"):
        logistic_regression.run(config, tmp_path)
    assert (tmp_path / "config.json").exists()
    assert json.loads((tmp_path / "metrics.jsonl").read_text().splitlines()[0])["step"] == 1
