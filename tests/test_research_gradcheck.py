"""End-to-end: research.gradcheck on its smoke config; every error small."""

import json

import pytest

from research import gradcheck
from research.common import get_config

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("gradcheck")
    config = get_config("gradcheck", "smoke")
    return gradcheck.run(config, workdir), workdir


def test_writes_every_output(run):
    _, workdir = run
    for name in (
        "config.json",
        "metrics.json",
        "metrics.jsonl",
        "tables.md",
        "errors.png",
        "checks.json",
    ):
        assert (workdir / name).stat().st_size > 0, name


def test_errors_are_small(run):
    metrics = run[0]
    assert metrics["max_rel_error_float64"] <= 1e-10
    assert metrics["max_rel_error_float32"] <= 2e-5
    assert metrics["max_rel_error_finite_difference"] <= 1e-6
    assert metrics["all_within_tolerance"] is True
    assert metrics["failures"] == []


def test_covers_every_loss_option_and_dtype(run):
    checks = json.loads((run[1] / "checks.json").read_text())
    grads = checks["grad"]
    assert {r["dtype"] for r in grads} == {"float32", "float64"}
    assert {r["grad_dtype"] for r in grads} == {"float32", "float64"}
    options = {(r["loss"], r["options"]) for r in grads}
    assert len(options) == 30
    assert ("softmax_cross_entropy_with_integer_labels", "ignore_index") in options
    fd_losses = {r["loss"] for r in checks["finite_difference"]}
    assert {"softmax_focal_loss", "poly_loss_cross_entropy", "js_divergence"} <= fd_losses
    assert len(checks["hessian"]) == 12


def test_errors_measure_nan_as_failure():
    assert gradcheck.errors([1.0, float("nan")], [1.0, 2.0]) == (float("inf"), float("inf"))
    assert gradcheck.errors([1.0, 2.5], [1.0, 2.0]) == (0.5, 0.25)
