"""The research scripts' command line (absl + ml_collections.config_flags) and config checks:
every mistake named in one line, exit status 2, nothing written; progress lines in logs."""

from __future__ import annotations

import ast
import io
import json
import re
import subprocess
import sys
from pathlib import Path

import ml_collections
import pytest

from research import logistic_regression, softmax_regression
from research.common import ConfigError, NonFiniteLossError, check_finite, get_config, progress
from research.common.config import CONFIG_DIR, REPO_ROOT, check_config, unknown_key_message
from research.common.guard import LogProgress

NAMES = [
    "logistic_regression",
    "softmax_regression",
    "flax_classifier",
    "gradcheck",
    "seed_examples",
    "headline_claims",
]


@pytest.mark.parametrize("name", NAMES)
def test_every_config_has_default_smoke_and_launch_command(name):
    default, smoke = get_config(name), get_config(name, "smoke")
    assert isinstance(default, ml_collections.ConfigDict)
    assert default.to_dict() != smoke.to_dict()
    docstring = ast.get_docstring(ast.parse((CONFIG_DIR / f"{name}.py").read_text()))
    assert f"python -m research.{name} --config configs/{name}.py" in docstring
    assert f"configs/{name}.py:smoke" in docstring
    assert "--workdir" in docstring
    with pytest.raises(ValueError, match="unknown config variant 'bogus'"):
        get_config(name, "bogus")


def test_no_research_module_parses_argv_by_hand_or_imports_private_xent_jax_names():
    for path in sorted((REPO_ROOT / "research").rglob("*.py")):
        text = path.read_text()
        assert "argparse" not in text, path
        assert "sys.argv[1" not in text.replace("sys.argv[1:]", ""), path
        assert not re.search(r"xent_jax\._|from xent_jax\._|import xent_jax\._", text), path


def test_unknown_key_message_names_the_closest_key():
    config = get_config("logistic_regression")
    message = unknown_key_message(config, "learning_rat")
    assert message.startswith("unknown config key 'config.learning_rat'.")
    assert "Did you mean 'config.learning_rate'?" in message
    assert "Valid keys: C, bar," in message


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        ("C", -1.0, r"'config.C': -1.0 \(must be > 0\)"),
        ("solvers", ("lbfgs", "bfgs"), r"'config.solvers'"),
        ("optimizer", "adamm", r"'config.optimizer': 'adamm' \(an optax optimiser name\)"),
        ("test_size", 1.5, r"'config.test_size'"),
    ],
)
def test_semantic_checks_name_the_key(tmp_path, key, value, message):
    config = get_config("logistic_regression")
    config[key] = value
    with pytest.raises(ConfigError, match=message):
        logistic_regression.run(config, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_dataset_check(tmp_path):
    config = get_config("softmax_regression")
    config.datasets = ("iris", "mnist")
    with pytest.raises(ConfigError, match=r"'config.datasets'"):
        softmax_regression.run(config, tmp_path)


def test_check_config_names_a_rule_for_a_missing_key():
    config = get_config("seed_examples")
    with pytest.raises(ConfigError, match=r"unknown config key 'config.pointz'.*'config.points'"):
        check_config(config, {"pointz": (lambda v: True, "")})


def test_check_finite():
    assert check_finite(1.5, step=3, what="x") == 1.5
    with pytest.raises(
        NonFiniteLossError,
        match="adam: loss became nan at step 4; stopping; outputs written so far are kept in /w",
    ):
        check_finite(float("nan"), step=4, what="adam", workdir="/w")


def test_progress_writes_one_line_when_not_a_terminal():
    log = io.StringIO()  # not a terminal, as a redirected stderr
    bar = progress(10, "lbfgs", file=log)
    assert isinstance(bar, LogProgress)
    with bar:
        for _ in range(10):
            bar.update(1)
            bar.set_postfix(objective="1.5")
    assert "\r" not in log.getvalue()
    lines = log.getvalue().splitlines()
    assert len(lines) == 1
    assert re.fullmatch(r"lbfgs: 10/10 in \S+ s \(objective=1\.5\)", lines[0])


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", *args],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (
            ["--config.pointz=10"],
            "error: unknown config key 'config.pointz'. Did you mean 'config.points'?",
        ),
        (["--config.points.x=10"], "error: unknown config key 'config.points.x'"),
        (["--config.points=many"], "error: flag --config.points=many:"),
        (["--config.points=1"], "error: bad value for 'config.points': 1 (between 10 and 100000)"),
        (["--work_dir=x"], "error: Unknown command line flag 'work_dir'. Did you mean: workdir ?"),
    ],
)
def test_cli_mistakes_are_one_line_and_exit_2_before_writing(tmp_path, args, message):
    workdir = tmp_path / "out"
    proc = _cli(
        "research.seed_examples",
        "--config",
        "configs/seed_examples.py:smoke",
        "--workdir",
        str(workdir),
        *args,
    )
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip().splitlines() == [proc.stderr.strip()]  # one line, no traceback
    assert proc.stderr.startswith(message), proc.stderr
    assert not workdir.exists()


@pytest.mark.parametrize(
    ("config", "message"),
    [
        ("configs/seed_examples.py:bogus", "unknown config variant 'bogus'"),
        ("configs/nope.py", "No such file or directory"),
    ],
)
def test_cli_config_file_errors_are_one_line(tmp_path, config, message):
    proc = _cli("research.seed_examples", "--config", config, "--workdir", str(tmp_path / "out"))
    assert proc.returncode == 2
    assert len(proc.stderr.strip().splitlines()) == 1 and message in proc.stderr, proc.stderr


def test_cli_comma_list_is_a_tuple(tmp_path):
    # The check sees both names (comma split), so the message lists the tuple.
    proc = _cli(
        "research.softmax_regression",
        "--config",
        "configs/softmax_regression.py:smoke",
        "--workdir",
        str(tmp_path / "out"),
        "--config.datasets=iris,mnist",
    )
    assert proc.returncode == 2
    assert "bad value for 'config.datasets': ('iris', 'mnist')" in proc.stderr


@pytest.mark.slow
def test_cli_runs_with_overrides_and_writes_the_workdir(tmp_path):
    workdir = tmp_path / "out"
    proc = _cli(
        "research.seed_examples",
        "--config",
        "configs/seed_examples.py:smoke",
        "--workdir",
        str(workdir),
        "--config.points=20",
    )
    assert proc.returncode == 0, proc.stderr
    assert f"seed_examples: results in {workdir}" in proc.stdout
    assert json.loads((workdir / "config.json").read_text()) == {"points": 20}
    assert "\r" not in proc.stderr  # no progress-bar redraws in a redirected log


def test_launch_commands_in_docstrings_use_the_common_form():
    for path in sorted((REPO_ROOT / "research").glob("*.py")):
        text = path.read_text()
        if "cli.define_flags(" not in text:
            continue
        name = path.stem
        assert f"python -m research.{name} --config configs/{name}.py" in text, path
        assert Path(CONFIG_DIR / f"{name}.py").exists(), path
