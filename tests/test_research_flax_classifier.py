"""End-to-end: research.flax_classifier on its smoke config, accuracy bar asserted."""

import json

import pytest

from research import flax_classifier
from research.common import get_config

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("flax_classifier")
    config = get_config("flax_classifier", "smoke")
    return flax_classifier.run(config, workdir), workdir, config


def test_writes_every_output(run):
    _, workdir, config = run
    for name in ("config.json", "metrics.json", "metrics.jsonl", "tables.md", "curves.png"):
        assert (workdir / name).stat().st_size > 0, name
    lines = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    assert len(lines) == len(config.models) * config.epochs
    assert {"test_accuracy", "train_loss", "epoch", "model"} <= set(lines[0])


@pytest.mark.parametrize("model", ["mlp", "cnn"])
def test_accuracy_bar_on_held_out_digits(run, model):
    result = run[0]["models"][model]
    assert result["test_accuracy"] >= 0.97
    assert result["meets_bar"] is True


def test_label_smoothing_is_visible_in_the_training_loss(run):
    # With smoothing 0.1 over 10 classes the training loss cannot go below the target's entropy
    # (about 0.50 nats); the unsmoothed test loss can.
    for result in run[0]["models"].values():
        assert min(result["curves"]["train_loss"]) > 0.45
        assert result["test_loss"] < min(result["curves"]["train_loss"])
