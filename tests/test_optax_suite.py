"""optax's own classification-loss tests, run against xent_jax's same-named functions.

The test module that ships inside the installed optax (``optax/losses/_classification_test.py``)
is loaded unmodified apart from one line: its import of optax's losses module becomes an import
of :data:`XENT_JAX` (xent_jax's functions under their optax names). Its ``absltest`` classes are
``unittest.TestCase`` subclasses, collected by pytest from this module.

Every case passes, or is listed once in :data:`NOT_IN_XENT_JAX` (skipped: optax functions
xent_jax does not have) or :data:`DIFFERENCES` (``xfail(strict=True)``: a difference that
``docs/compatibility.md`` documents and ``tests/test_compatibility.py`` pins).
"""

from __future__ import annotations

import inspect
import types
import unittest
from pathlib import Path

import numpy as np
import optax
import pytest

import xent_jax

SOURCE = Path(optax.__file__).parent / "losses" / "_classification_test.py"
IMPORT = "from optax.losses import _classification\n"
SUBSTITUTE = "_classification = XENT_JAX  # xent_jax in place of optax.losses._classification\n"


class _XentJax(types.SimpleNamespace):
    """optax's loss names, bound to xent_jax's functions; a name xent_jax lacks raises."""

    def __getattr__(self, name: str):
        raise AttributeError(f"xent_jax has no {name} (an optax-only loss)")


_OPTAX_NAMES = [name for name in dir(optax.losses) if not name.startswith("_")]
XENT_JAX = _XentJax(**{n: getattr(xent_jax, n) for n in _OPTAX_NAMES if hasattr(xent_jax, n)})

# Test id (a class, or "Class.test_method" with absl's parameter index) -> the optax function
# under test that xent_jax does not have. Skipped with that reason.
NOT_IN_XENT_JAX = {
    "SafeSoftmaxCrossEntropyTest": "safe_softmax_cross_entropy",
    "HingeTest": "hinge_loss / multiclass_hinge_loss",
    "SparsemaxTest": "sparsemax_loss / multiclass_sparsemax_loss",
    "GeneralizedKLDivergenceTest": "generalized_kl_divergence / convex_kl_divergence",
    "PerceptronTest": "perceptron_loss / multiclass_perceptron_loss",
    "KLDivergenceWithLogTargetsTest": "kl_divergence_with_log_targets",
    "CTCTest": "ctc_loss / ctc_loss_with_forward_probs",
}
# Test id -> the documented difference (docs/compatibility.md) that makes it fail.
_KL_ARGUMENTS = (
    "kl_divergence(p, q) takes two probability vectors, KL(p || q); optax's "
    "kl_divergence(log_predictions, targets) takes log-predictions first and returns "
    "KL(targets || predictions)"
)
_KEYWORD_ONLY = (
    "xent_jax's options are keyword-only; optax's test passes axis positionally "
    "(fn(logits, labels, axis))"
)
DIFFERENCES: dict[str, str] = {
    "KLDivergenceTest.test_scalar": _KL_ARGUMENTS,
    "KLDivergenceTest.test_batched": _KL_ARGUMENTS,
    **{f"SoftmaxCrossEntropyWithIntegerLabelsTest.test_axes{i}": _KEYWORD_ONLY for i in range(8)},
}


def _load_optax_tests() -> types.ModuleType:
    source = SOURCE.read_text()
    assert source.count(IMPORT) == 1, f"optax's test module no longer has {IMPORT!r}"
    module = types.ModuleType("optax_classification_test_on_xent_jax")
    module.__file__ = str(SOURCE)
    module.XENT_JAX = XENT_JAX
    code = compile(source.replace(IMPORT, SUBSTITUTE), str(SOURCE), "exec")
    exec(code, module.__dict__)
    return module


def _test_ids(cls: type) -> list[str]:
    return [f"{cls.__name__}.{name}" for name in dir(cls) if name.startswith("test")]


def _listed(test_id: str, table: dict[str, str]) -> str | None:
    class_name = test_id.split(".")[0]
    return table.get(test_id, table.get(class_name))


def _collect() -> dict[str, type]:
    classes = {}
    for name, cls in inspect.getmembers(_load_optax_tests(), inspect.isclass):
        if not issubclass(cls, unittest.TestCase) or not name.endswith("Test"):
            continue
        for test_id in _test_ids(cls):
            method = test_id.split(".")[1]
            missing, difference = _listed(test_id, NOT_IN_XENT_JAX), DIFFERENCES.get(test_id)
            assert not (missing and difference), test_id
            if missing:
                mark = pytest.mark.skip(reason=f"not in xent_jax: {missing}")
            elif difference:
                mark = pytest.mark.xfail(strict=True, reason=difference)
            else:
                continue
            setattr(cls, method, mark(getattr(cls, method)))
        classes[name] = cls
    return classes


CLASSES = _collect()
globals().update(CLASSES)


@pytest.fixture(autouse=True)
def _seeded_numpy():
    # optax's cases draw from NumPy's global generator unseeded; seeded here, each run is the same.
    state = np.random.get_state()  # noqa: NPY002 (optax draws from the global generator)
    np.random.seed(0)  # noqa: NPY002
    yield
    np.random.set_state(state)  # noqa: NPY002


def test_every_listed_case_exists():
    ids = {i for cls in CLASSES.values() for i in _test_ids(cls)}
    classes = {i.split(".")[0] for i in ids}
    for listed in [*NOT_IN_XENT_JAX, *DIFFERENCES]:
        assert listed in ids or listed in classes, listed


def test_listed_functions_are_really_missing_from_xent_jax():
    for names in NOT_IN_XENT_JAX.values():
        for name in names.split(" / "):
            assert hasattr(optax.losses, name), name
            assert not hasattr(xent_jax, name), name
