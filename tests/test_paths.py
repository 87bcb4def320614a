"""Every path of the softmax cross-entropy engine gives the plain loss's numbers and errors.

One table of option sets (``tests/paths_check.py``: every option alone, the combinations people
use, static and traced values, float32 / float64 / bfloat16 inputs, each reduction) runs through
every path: the plain integer-label loss, the same on logits sharded along the classes, the
explicit vocab-parallel loss, the fused linear loss with ``w = I`` (also with ``w`` sharded), the
closed-form gradients and the dense loss on one-hot targets. A child process on 4 simulated CPU
devices runs the whole table once (JAX fixes its device count at start-up); this module asserts:

* the plain path matches the float64 NumPy reference;
* every other path gives the plain path's values and reverse-mode gradients, or, where the plain
  path raises, the same error type;
* forward mode (``jax.jvp``) and ``jax.hessian`` agree on the paths that promise them; the others
  either deliver them or say which function does;
* values every path must refuse raise the same error type on every path, naming the argument;
* every registered loss works on inputs sharded along the classes, or says clearly that it
  does not (``tests/registry.py``).

Known disagreements are ``xfail(strict=True)``: fixing one turns its test into a failure that
asks for the mark to go.
"""

from __future__ import annotations

import functools
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest

from tests import paths_check as table
from tests import reference, registry
from tests.tolerances import assert_close

ROOT = Path(__file__).resolve().parent.parent
# Compile time is all this table spends (6 x 8 inputs): the child skips LLVM's optimisations,
# which change no arithmetic (no fast-math) but halve nothing else it does.
CHILD_XLA_FLAGS = (
    f"--xla_force_host_platform_device_count={table.DEVICES} --xla_backend_optimization_level=0"
)
# The function that promises forward mode, which an error of a path without it should name.
FORWARD_MODE_FUNCTION = "softmax_cross_entropy_with_integer_labels"


@functools.cache
def child_results() -> dict:
    env = dict(os.environ)
    env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") + " " + CHILD_XLA_FLAGS).strip()
    env["JAX_PLATFORMS"] = "cpu"
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    proc = subprocess.run(
        [sys.executable, "-m", "tests.paths_check"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    if proc.returncode != 0:
        pytest.fail(f"paths_check failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


# ---------------------------------------------------------------------------------------------
# Known disagreements: (check, path, predicate on the case or row name, reason). Each becomes an
# xfail(strict=True) on the matching tests.
# ---------------------------------------------------------------------------------------------

KNOWN: list[tuple[str, str, object, str]] = [
    *(
        (
            "forward_probe",
            path,
            lambda name: True,
            "issue 15 (forward mode): jax.jvp of the fused loss (a custom VJP) fails with JAX's "
            "'can't apply forward-mode autodiff (jvp) to a custom_vjp function'; the design asks "
            "for an error that names the function that has forward mode "
            "(softmax_cross_entropy_with_integer_labels of x @ w + b)",
        )
        for path in ("fused", "fused_sharded")
    ),
    *(
        (
            check,
            path,
            lambda name: name == "all_where_classes-bfloat16-static",
            "issue 15/16 (temperature): with bfloat16 logits sharded along the classes, "
            "temperature=1.5 gives values up to 3e-3 away from the plain path (which matches "
            "the float64 reference); the scaling seems to round in bfloat16",
        )
        for check, path in (
            ("values", "plain_sharded"),
            ("values", "vocab_parallel"),
            ("forward", "plain_sharded"),
        )
    ),
]


def _marks(check: str, path: str, name: str) -> list:
    reasons = [
        reason
        for known_check, known_path, applies, reason in KNOWN
        if known_check == check and known_path == path and applies(name)
    ]
    return [pytest.mark.xfail(strict=True, reason="; ".join(reasons))] if reasons else []


def _params(check: str, pairs) -> list:
    return [
        pytest.param(case, path, id=f"{case.id}-{path}", marks=_marks(check, path, case.id))
        for case, path in pairs
    ]


CASES = table.cases()
OTHER_PATHS = [
    (case, path) for case in CASES for path in table.ROW[case.row].paths() if path != "plain"
]
FORWARD_CASES = [
    (case, path)
    for case in CASES
    for path in table.ROW[case.row].paths()
    if path in table.FORWARD_MODE and not case.traced and case.refused is None
]
HESSIAN_CASES = [
    (case, path)
    for case in table.hessian_cases()
    for path in table.ROW[case.row].paths()
    if path in table.FORWARD_MODE
]
REFUSED_ROWS = [row for row in table.ROWS if row.raises]


def _entry(case, path) -> dict:
    return child_results()["cases"][f"{case.id}/{path}"]


def _loss_dtype(case) -> type:
    """Losses are float64 for float64 inputs and float32 otherwise (half inputs included)."""
    return np.float64 if case.dtype == "float64" else np.float32


def _grad_dtype(case) -> str:
    return case.dtype  # gradients come back in the input dtype


def _assert_error(got: dict | None, expected_type: str, pattern: str, where: str) -> None:
    assert got is not None, f"{where}: no error, expected {expected_type} naming {pattern!r}"
    assert got["type"] == expected_type, (where, got)
    assert re.search(pattern, got["message"]), (where, got)


def test_child_sees_four_devices():
    assert child_results()["device_count"] == table.DEVICES


# ---------------------------------------------------------------------------------------------
# The plain path against the float64 reference.
# ---------------------------------------------------------------------------------------------


def _rounded(array: np.ndarray, dtype: str) -> np.ndarray:
    """``array`` rounded to ``dtype`` (``"bfloat16"`` included), back in float64."""
    return np.asarray(array).astype(jnp.dtype(dtype)).astype(np.float64)


def _reference(case, reduction: str):
    """The float64 NumPy loss on the case's inputs as rounded to its dtype (classes last)."""
    row = table.ROW[case.row]
    # Class weights are passed in float32 with half-precision logits (tests/paths_check.py).
    weights_dtype = "float32" if case.dtype == "bfloat16" else case.dtype
    opts = {
        name: _rounded(value, weights_dtype) if name == "class_weights" else value
        for name, value in row.options.items()
    }
    logits = _rounded(table.LOGITS, case.dtype)
    if "temperature" in opts:
        # The softmax sees softcap(z) / T: the logits and the cap scaled by 1 / T.
        temperature = opts.pop("temperature")
        logits = logits / temperature
        if opts.get("logit_softcap") is not None:
            opts["logit_softcap"] = opts["logit_softcap"] / temperature
    with np.errstate(divide="ignore", invalid="ignore"):  # the row whose classes are all masked
        return reference.softmax_cross_entropy_with_integer_labels(
            logits, row.label_array, reduction=reduction, **opts
        )


@pytest.mark.parametrize("case", [c for c in CASES if c.refused is None], ids=lambda c: c.id)
def test_plain_path_matches_the_float64_reference(case):
    entry = _entry(case, "plain")
    assert not entry["errors"], entry["errors"]
    for reduction in table.REDUCTIONS:
        assert_close(
            entry["value"][reduction],
            _reference(case, reduction),
            _loss_dtype(case),
            err_msg=reduction,
        )


@pytest.mark.parametrize("case", [c for c in CASES if c.refused], ids=lambda c: c.id)
def test_plain_path_refuses_traced_static_options(case):
    error_type, name = case.refused
    _assert_error(_entry(case, "plain")["errors"].get("values"), error_type.__name__, name, case.id)


# ---------------------------------------------------------------------------------------------
# Every other path against the plain one.
# ---------------------------------------------------------------------------------------------


def _expected_gradients(case) -> dict:
    """The plain path's gradient of each reduction: "sum" is that of "none" (ones cotangent),
    "mean" that divided by the mean's denominator (sum / mean of the plain values)."""
    plain = _entry(case, "plain")
    grad = np.asarray(plain["grad"]["none"])
    total, mean = plain["value"]["sum"], plain["value"]["mean"]
    assert total != 0.0, case.id
    return {"none": grad, "sum": grad, "mean": grad * (mean / total)}


@pytest.mark.parametrize(("case", "path"), _params("values", OTHER_PATHS))
def test_values_and_gradients_equal_the_plain_path(case, path):
    entry, plain = _entry(case, path), _entry(case, "plain")
    if "values" in plain["errors"]:
        expected = plain["errors"]["values"]
        got = entry["errors"].get("values")
        _assert_error(got, expected["type"], "", f"{case.id}/{path}")
        if case.refused:
            _assert_error(got, case.refused[0].__name__, case.refused[1], f"{case.id}/{path}")
        return
    assert "values" not in entry["errors"], entry["errors"]
    if path != "analytic":
        for reduction in table.REDUCTIONS:
            assert_close(
                entry["value"][reduction],
                plain["value"][reduction],
                _loss_dtype(case),
                err_msg=f"value, reduction={reduction}",
            )
    expected = _expected_gradients(case)
    for reduction, grad in entry["grad"].items():
        assert_close(grad, expected[reduction], _grad_dtype(case), err_msg=f"gradient, {reduction}")


@pytest.mark.parametrize(("case", "path"), _params("forward", FORWARD_CASES))
def test_forward_mode_equals_the_plain_path(case, path):
    entry, plain = _entry(case, path), _entry(case, "plain")
    assert "forward" not in entry["errors"], entry["errors"]["forward"]
    if path == "plain":
        # Forward and reverse mode agree: the JVPs of the examples sum to <gradient, tangent>.
        tangent = table.TANGENT.T if table.ROW[case.row].axis == 0 else table.TANGENT
        inner = float(np.sum(np.asarray(plain["grad"]["none"]) * _rounded(tangent, case.dtype)))
        assert_close(np.sum(entry["jvp"]["none"]), inner, _grad_dtype(case))
    else:
        assert_close(entry["jvp"]["none"], plain["jvp"]["none"], _loss_dtype(case))


@pytest.mark.parametrize(("case", "path"), _params("hessian", HESSIAN_CASES))
def test_hessian_equals_the_plain_path(case, path):
    entry, plain = _entry(case, path), _entry(case, "plain")
    assert "hessian" not in entry["errors"], entry["errors"]["hessian"]
    hessian = np.asarray(entry["hessian"])
    assert hessian.shape == (table.N, table.K, table.N, table.K)
    if path == "plain" and case.row == "defaults":
        # No options: the diagonal blocks are diag(p) - p p^T, the others 0.
        z = table.LOGITS
        p = np.exp(z - z.max(-1, keepdims=True))
        p /= p.sum(-1, keepdims=True)
        blocks = np.zeros_like(hessian)
        for i in range(table.N):
            blocks[i, :, i, :] = np.diag(p[i]) - np.outer(p[i], p[i])
        assert_close(hessian, blocks, _loss_dtype(case))
    else:
        assert_close(hessian, np.asarray(plain["hessian"]), _loss_dtype(case))


def _probe_params() -> list:
    paths = [p for p in table.PATHS if p not in table.FORWARD_MODE and p != "analytic"]
    return [pytest.param(p, id=p, marks=_marks("forward_probe", p, "defaults")) for p in paths]


@pytest.mark.parametrize("path", _probe_params())
def test_paths_without_forward_mode_deliver_it_or_name_the_function_that_does(path):
    probe = child_results()["forward_probe"][path]
    if "error" in probe:
        assert FORWARD_MODE_FUNCTION in probe["error"]["message"], probe["error"]
    else:
        plain = child_results()["cases"]["defaults-float32-static/plain"]
        assert_close(probe["jvp"], plain["jvp"]["none"], np.float32)


# ---------------------------------------------------------------------------------------------
# Values every path refuses.
# ---------------------------------------------------------------------------------------------


def _refusal_params() -> list:
    return [
        pytest.param(row, path, id=f"{row.name}-{path}", marks=_marks("refusal", path, row.name))
        for row in REFUSED_ROWS
        for path in row.paths()
    ]


@pytest.mark.parametrize(("row", "path"), _refusal_params())
def test_every_path_refuses_the_same_values(row, path):
    error_type, pattern = row.raises
    got = child_results()["refusals"][f"{row.name}/{path}"].get("error")
    _assert_error(got, error_type.__name__, pattern, f"{row.name}/{path}")


# ---------------------------------------------------------------------------------------------
# Every registered loss on inputs sharded along the classes.
# ---------------------------------------------------------------------------------------------


def _registry_params() -> list:
    return [
        pytest.param(name, id=name, marks=_marks("sharded_inputs", "registry", name))
        for name in registry.select()
    ]


@pytest.mark.parametrize("name", _registry_params())
def test_registered_loss_on_sharded_inputs(name):
    outcome = child_results()["registry"][name]
    assert "error" not in outcome["single"], outcome["single"]
    sharded = outcome["sharded"]
    if "error" in sharded and not registry.REGISTRY[name].sharded:
        # Allowed to refuse, but in words: a clear error of the library, not JAX's raw one.
        assert sharded["error"]["type"] != "ShardingTypeError", sharded["error"]
        assert re.search("shard", sharded["error"]["message"], re.I), sharded["error"]
        return
    assert "error" not in sharded, sharded
    for key in ("value", "grad", "sum"):
        assert_close(sharded[key], outcome["single"][key], np.float32, err_msg=key)
