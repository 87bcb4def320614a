"""The research config layer: loading, dotted overrides, clear errors naming the key."""

import ast
import subprocess
import sys

import ml_collections
import pytest

from research import logistic_regression, softmax_regression
from research.common import ConfigError, NonFiniteLossError, apply_override, check_finite
from research.common.config import CONFIG_DIR, REPO_ROOT, load_config, parse_args

NAMES = [
    "logistic_regression",
    "softmax_regression",
    "flax_classifier",
    "gradcheck",
    "seed_examples",
]


@pytest.mark.parametrize("name", NAMES)
def test_every_config_has_default_smoke_and_launch_command(name):
    path = CONFIG_DIR / f"{name}.py"
    default, smoke = load_config(path), load_config(f"{path}:smoke")
    assert isinstance(default, ml_collections.ConfigDict)
    assert default.to_dict() != smoke.to_dict()
    docstring = ast.get_docstring(ast.parse(path.read_text()))
    assert f"python -m research.{name} --config configs/{name}.py" in docstring
    assert f"configs/{name}.py:smoke" in docstring
    with pytest.raises(ValueError, match="unknown config variant 'bogus'"):
        load_config(f"{path}:bogus")


def test_overrides_parse_as_the_current_type():
    config = load_config(CONFIG_DIR / "softmax_regression.py")
    apply_override(config, "learning_rate", "0.1")
    apply_override(config, "steps", "7")
    apply_override(config, "datasets", "iris")
    apply_override(config, "solvers", "('lbfgs', 'newton')")
    assert config.learning_rate == 0.1 and isinstance(config.learning_rate, float)
    assert config.steps == 7 and isinstance(config.steps, int)
    assert config.datasets == ("iris",)
    assert config.solvers == ("lbfgs", "newton")


def test_unknown_key_is_named_with_a_suggestion():
    config = load_config(CONFIG_DIR / "logistic_regression.py")
    with pytest.raises(
        ConfigError,
        match=r"unknown config key 'config.learning_rat'.*"
        r"Did you mean 'config.learning_rate'",
    ):
        apply_override(config, "learning_rat", "0.1")
    with pytest.raises(ConfigError, match=r"unknown config key 'config.C.x'"):
        apply_override(config, "C.x", "1")


@pytest.mark.parametrize(
    ("key", "value"), [("learning_rate", "fast"), ("steps", "1.5"), ("steps", "many")]
)
def test_bad_value_is_named(key, value):
    config = load_config(CONFIG_DIR / "logistic_regression.py")
    with pytest.raises(ConfigError, match=rf"bad value for 'config.{key}': '{value}'"):
        apply_override(config, key, value)


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        ("C", "-1", r"'config.C': -1.0 \(must be > 0\)"),
        ("solvers", "lbfgs,bfgs", r"'config.solvers'"),
        ("optimizer", "adamm", r"'config.optimizer': 'adamm' \(an optax optimiser name\)"),
        ("test_size", "1.5", r"'config.test_size'"),
    ],
)
def test_semantic_checks_name_the_key(tmp_path, key, value, message):
    config = load_config(CONFIG_DIR / "logistic_regression.py")
    apply_override(config, key, value)
    with pytest.raises(ConfigError, match=message):
        logistic_regression.main(config, tmp_path)


def test_dataset_check(tmp_path):
    config = load_config(CONFIG_DIR / "softmax_regression.py")
    apply_override(config, "datasets", "iris,mnist")
    with pytest.raises(ConfigError, match=r"'config.datasets'"):
        softmax_regression.main(config, tmp_path)


def test_parse_args_forms(tmp_path):
    config, workdir = parse_args(
        [
            "--config",
            f"{CONFIG_DIR}/gradcheck.py:smoke",
            "--config.batch",
            "5",
            "--config.reductions=mean",
            f"--workdir={tmp_path}",
        ],
        "gradcheck",
    )
    assert (config.batch, config.reductions, config.num_classes) == (5, ("mean",), 3)
    assert workdir == tmp_path
    config, workdir = parse_args([], "gradcheck")  # the default config, no workdir
    assert config.batch == 6 and workdir is None
    with pytest.raises(ConfigError, match="unknown flag --work_dir"):
        parse_args(["--work_dir", "x"], "gradcheck")
    with pytest.raises(ConfigError, match=r"file 'configs/nope\.py' not found"):
        parse_args(["--config", "configs/nope.py"], "gradcheck")


def test_check_finite():
    assert check_finite(1.5, step=3, what="x") == 1.5
    with pytest.raises(
        NonFiniteLossError,
        match="adam: loss became nan at step 4; stopping; outputs written so far are kept in /w",
    ):
        check_finite(float("nan"), step=4, what="adam", workdir="/w")


def test_cli_reports_unknown_key_and_exits_2(tmp_path):
    workdir = tmp_path / "out"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "research.seed_examples",
            "--config",
            "configs/seed_examples.py:smoke",
            "--config.pointz=10",
            "--workdir",
            str(workdir),
        ],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 2
    assert "unknown config key 'config.pointz'" in proc.stderr
    assert "Did you mean 'config.points'" in proc.stderr
    assert not workdir.exists()
