"""research.run_all (what `make run` calls) on the smoke configs: summary keys, report, and a
second run that keeps the first."""

import json
import re

import pytest

from research import run_all
from research.common import report

pytestmark = pytest.mark.slow

REGRESSION = {"objective", "sklearn_objective", "rel_gap", "test_accuracy", "sklearn_test_accuracy"}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    runs_dir = tmp_path_factory.mktemp("runs")
    rc = run_all.run(runs_dir, smoke=True)
    first = (runs_dir / "latest").resolve()
    rc2 = run_all.run(runs_dir, smoke=True, only=["seed_examples"])
    second = (runs_dir / "latest").resolve()
    return runs_dir, (rc, first), (rc2, second)


def test_summary_has_the_issue_keys(runs):
    _, (rc, first), _ = runs
    assert rc == 0
    summary = json.loads((first / "summary.json").read_text())
    for solver in ("adam", "lbfgs", "newton"):
        assert REGRESSION <= set(summary["logistic_regression"][solver])
    assert REGRESSION <= set(summary["softmax_regression"]["iris"])  # smoke: iris only
    for model in ("mlp", "cnn"):
        assert summary["flax_classifier"][model]["test_accuracy"] >= 0.97
    assert summary["gradcheck"]["max_rel_error_float64"] <= 1e-10
    assert summary["gradcheck"]["max_rel_error_float32"] <= 2e-5
    assert summary["seed_examples"]["all_match"] is True
    assert summary["seed_examples"]["cases"] == 9
    assert summary["headline_claims"]["all_bars_met"] is True
    assert len(summary["headline_claims"]["claims"]) == 5
    assert summary["all_bars_met"] is True
    for solver in ("lbfgs", "newton"):
        assert abs(summary["logistic_regression"][solver]["rel_gap"]) <= 1e-6


def test_report_links_resolve(runs):
    _, (_, first), _ = runs
    report = (first / "report.md").read_text()
    links = re.findall(r"\]\(([^)]+)\)", report)
    assert sum(link.endswith(".png") for link in links) >= 7
    for link in links:
        assert (first / link).exists(), link
    for section in (
        "Logistic regression",
        "Softmax regression",
        "Flax",
        "Gradient check",
        "Seed articles",
        "Headline claims (measured in this run)",
    ):
        assert section in report


def test_report_opens_with_what_it_shows_and_ends_with_a_conclusion(runs):
    _, (_, first), _ = runs
    report = (first / "report.md").read_text()
    summary = json.loads((first / "summary.json").read_text())
    opening = report.split("\n\n")[2]
    assert opening.startswith("This run checks xent_jax")
    for title in (
        "Understanding Cross Entropy Loss",
        "Do you want to learn AI, learn Cross-Entropy First?",
        "Cross-Entropy Loss Function - How it Adjusts Weights",
    ):
        assert title in opening
    # Figures of this run, not canned text: the Flax accuracy and the fused memory ratio.
    accuracy = summary["flax_classifier"]["mlp"]["test_accuracy"]
    assert f"mlp {accuracy:.1%}" in opening
    assert f"{summary['headline_claims']['fused_memory']['ratio']:.3f}" in opening
    # The claims come before the bars, the conclusion last, computed from the bars.
    assert report.index("## Headline claims") < report.index("## Bars")
    conclusion = report.split("## Conclusion\n\n")[1]
    bars, scripts = len(summary["bars"]), len(summary["scripts"])
    assert conclusion.startswith(f"{bars} of {bars} bars met by {scripts} of {scripts} scripts")


def test_second_run_keeps_the_first(runs):
    runs_dir, (_, first), (rc2, second) = runs
    assert rc2 == 0
    assert second != first and second.parent == first.parent
    assert json.loads((first / "summary.json").read_text())["flax_classifier"]
    assert (first / "flax_classifier" / "curves.png").exists()
    assert (runs_dir / "latest").is_symlink()
    copy = (runs_dir / "report.md").read_text()
    links = re.findall(r"\]\(([^)]+)\)", copy)
    assert links and all(link.startswith(f"{second.name}/") for link in links)
    assert all((runs_dir / link).exists() for link in links)
    assert json.loads((runs_dir / "summary.json").read_text())["run"]["stamp"] == second.name


def test_conclusion_and_opening_follow_the_results():
    info = {"smoke": False, "backend": "cpu", "wall_time_s": 12.0}
    bar = {"check": "seed examples: every worked example reproduced", "bar": "all match"}
    results = {
        "seed_examples": {
            "status": "ok",
            "summary": {"all_match": False, "cases": 9, "checks": 18},
            "bars": [{**bar, "measured": "18 checks, 9 examples", "met": False}],
        },
        "gradcheck": {"status": "RuntimeError: boom", "summary": None, "bars": []},
        "some_new_script": {
            "status": "ok",
            "summary": {},
            "bars": [{"check": "x", "bar": "<= 1", "measured": "0.5", "met": True}],
        },
    }
    text = report.opening(info, results)
    assert "not all of the seed articles' 9 worked examples are reproduced" in text
    assert "gradcheck failed (RuntimeError: boom)" in text
    assert "some_new_script: 1 of 1 bars met" in text
    text = report.conclusion(info, results)
    assert text.startswith("1 of 2 bars met by 2 of 3 scripts in 12 s.")
    assert "Missed: seed examples: every worked example reproduced (18 checks" in text
    assert "Failed: gradcheck" in text
    assert "Every check of this run holds" not in text
