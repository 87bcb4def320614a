"""End-to-end: research.softmax_regression on its smoke config, bars asserted on the outputs."""

import json

import pytest

from research import softmax_regression
from research.common import get_config

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("softmax_regression")
    config = get_config("softmax_regression", "smoke")
    return softmax_regression.run(config, workdir), workdir


def test_writes_every_output(run):
    metrics, workdir = run
    for name in ("config.json", "metrics.json", "metrics.jsonl", "tables.md", "convergence.png"):
        assert (workdir / name).stat().st_size > 0, name
    assert json.loads((workdir / "metrics.json").read_text())["all_bars_met"] is True
    assert set(metrics["datasets"]) == {"iris"}  # the smoke config; digits in `make run`


@pytest.mark.parametrize("solver", ["lbfgs", "newton"])
def test_reaches_sklearn_objective(run, solver):
    row = run[0]["datasets"]["iris"]["solvers"][solver]
    assert abs(row["rel_gap"]) <= 1e-6
    assert row["xent_vs_numpy_rel"] < 1e-12
    assert row["test_accuracy"] == pytest.approx(row["sklearn_test_accuracy"], abs=0.02)


def test_dataset_entry_is_the_worst_bar_solver(run):
    entry = run[0]["datasets"]["iris"]
    assert entry["solver"] in ("lbfgs", "newton")
    assert abs(entry["rel_gap"]) == max(
        abs(entry["solvers"][s]["rel_gap"]) for s in ("lbfgs", "newton")
    )
