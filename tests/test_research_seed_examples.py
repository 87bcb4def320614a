"""End-to-end: research.seed_examples reproduces every worked example of the seed articles."""

import pytest

from research import seed_examples
from research.common import get_config

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("seed_examples")
    config = get_config("seed_examples", "smoke")
    return seed_examples.run(config, workdir), workdir


def test_all_worked_examples_match(run):
    metrics = run[0]
    assert metrics["all_match"] is True
    assert metrics["cases"] == 9
    for row in metrics["rows"]:
        assert row["bits_nats_consistent"]
        if row["match"] is not None:
            assert abs(row["computed_bits"] - row["expected_bits"]) <= row["tol_bits"]


@pytest.mark.parametrize(
    ("example", "bits"),
    [
        ("entropy 75% / 25%", 0.811278),
        ("container 1: 26 cubes / 4 spheres", 0.566510),
        ("container 2: 14 spheres / 16 cubes", 0.996792),
        ("cat [1,0,0,0] vs q=[0.4,0.3,0.1,0.1]", 1.321928),
        ("car [1,0,0,0] vs q=[0.775,0.116,0.039,0.070]", 0.367732),
    ],
)
def test_values_to_six_decimals(run, example, bits):
    rows = [r for r in run[0]["rows"] if r["example"] == example and r["match"] is not None]
    assert rows
    for row in rows:
        assert row["computed_bits"] == pytest.approx(bits, abs=1e-6)


def test_keras_route_renormalises_the_cat_prediction(run):
    (row,) = [
        r
        for r in run[0]["rows"]
        if r["route"].startswith("categorical") and r["example"].startswith("cat")
    ]
    assert row["match"] is None
    assert row["computed_bits"] == pytest.approx(1.169925, abs=1e-6)  # -log2(0.4 / 0.9)


def test_figures_written(run):
    workdir = run[1]
    for name in (
        "loss_vs_probability.png",
        "binary_entropy.png",
        "cross_entropy_shift.png",
        "config.json",
        "metrics.json",
        "metrics.jsonl",
        "tables.md",
    ):
        assert (workdir / name).stat().st_size > 0, name
