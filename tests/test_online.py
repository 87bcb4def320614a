"""The one-pass (GPU / TPU) formulation of the softmax row statistics, ``xent_jax._online``.

Its values and gradients are checked against the references by the modules that
``tests/conftest.py`` runs with both formulations; here: that each platform's lowering takes the
intended formulation (exported for CUDA and TPU from this CPU machine), that forcing it really
changes what runs, and the merge of partial row sums against float64 NumPy.
"""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import export

import xent_jax
from tests.formulation import one_pass_everywhere
from tests.tolerances import tolerance
from xent_jax import _online, _platform

N, K = 8, 16
LOGITS = f"tensor<{N}x{K}xf32>"

TARGETS = jax.nn.softmax(jnp.arange(N * K, dtype=jnp.float32).reshape(N, K) % 5)
LOSSES = {
    "integer": lambda z: xent_jax.softmax_cross_entropy_with_integer_labels(
        z, jnp.zeros((N,), jnp.int32)
    ),
    "integer_smoothing": lambda z: xent_jax.softmax_cross_entropy_with_integer_labels(
        z, jnp.zeros((N,), jnp.int32), label_smoothing=0.1, class_weights=jnp.ones((K,))
    ),
    "dense": lambda z: xent_jax.softmax_cross_entropy(z, TARGETS),
}


def _reductions_over_logits(fn, platform: str, dtype=jnp.float32) -> list[str]:
    """The ``stablehlo.reduce`` ops over ``[N, K]`` float32 operands in the exported module."""
    logits = jnp.zeros((N, K), dtype)
    module = export.export(jax.jit(fn), platforms=[platform])(logits).mlir_module()
    return [line for line in module.splitlines() if "stablehlo.reduce(" in line and LOGITS in line]


@pytest.mark.parametrize("loss", sorted(LOSSES))
@pytest.mark.parametrize("platform", ["cuda", "tpu"])
def test_accelerator_lowering_reads_the_logits_in_one_reduction(loss, platform):
    reductions = _reductions_over_logits(LOSSES[loss], platform)
    assert len(reductions) == 1, reductions
    # Variadic: the maximum, the sum of exponentials (and the other row sums) together.
    assert len(re.findall(r"init: ", reductions[0])) >= 2, reductions[0]


@pytest.mark.parametrize("loss", sorted(LOSSES))
@pytest.mark.parametrize(
    ("platform", "dtype"), [("cpu", jnp.float32), ("cpu", jnp.bfloat16), ("cuda", jnp.bfloat16)]
)
def test_cpu_and_half_precision_lowerings_keep_the_hinted_formulation(loss, platform, dtype):
    # The fast pass, and the careful fallback's maximum (and sums) inside the lax.cond.
    assert len(_reductions_over_logits(LOSSES[loss], platform, dtype)) >= 2


def test_sigmoid_sum_takes_one_reduction_on_accelerators_and_keeps_its_fallback_on_cpu():
    labels = (jnp.arange(N * K).reshape(N, K) % 3 == 0).astype(jnp.float32)
    loss = lambda z: xent_jax.sigmoid_binary_cross_entropy(z, labels, reduction="mean")
    assert len(_reductions_over_logits(loss, "cuda", jnp.bfloat16)) == 1
    assert len(_reductions_over_logits(loss, "cpu")) >= 2


def test_forcing_the_one_pass_formulation_changes_what_runs_on_cpu(formulation):
    z = jax.random.normal(jax.random.PRNGKey(0), (N, K))
    hlo = jax.jit(LOSSES["integer"]).lower(z).compile().as_text()
    # The CPU formulation's careful fallback is a conditional; the one-pass one has none.
    cpu_formulation = formulation == "per_platform" and jax.default_backend() == "cpu"
    assert ("conditional(" in hlo) == cpu_formulation


@pytest.fixture(params=["per_platform", "one_pass"])
def formulation(request):
    """Like the conftest's ``softmax_formulation``, for this module only."""
    with one_pass_everywhere(request.param == "one_pass"):
        yield request.param


def test_merged_row_sums_match_float64():
    rng = np.random.default_rng(0)
    z = rng.normal(0, 30, (6, 257)).astype(np.float32)
    z[1] = -np.inf  # an empty row
    z[2, :100] = -np.inf  # unavailable classes
    z[3, 5] = 80.0  # one dominant logit
    extra = rng.normal(size=z.shape).astype(np.float32)
    weights = np.where(np.isfinite(z), rng.uniform(0.5, 2.0, z.shape), 0).astype(np.float32)
    row_max, sum_exp, weight, centred, total = jax.jit(_online.online_row_sums)(
        jnp.asarray(z), jnp.asarray(extra), centred_weights=(jnp.asarray(weights),)
    )
    z64, w64 = z.astype(np.float64), weights.astype(np.float64)
    want_max = z64.max(-1)
    shift = np.where(np.isfinite(want_max), want_max, 0)
    with np.errstate(invalid="ignore"):
        want_sum = np.exp(z64 - shift[:, None]).sum(-1)
        centred_terms = np.where(w64 > 0, w64 * (z64 - shift[:, None]), 0)
    want_centred = centred_terms.sum(-1)
    want_sum[1] = z.shape[1]  # an empty row counts its (all -inf) terms, each with factor 1
    table = tolerance(jnp.float32)
    np.testing.assert_array_equal(np.asarray(row_max), want_max.astype(np.float32))
    np.testing.assert_allclose(np.asarray(sum_exp), want_sum, **table)
    np.testing.assert_allclose(np.asarray(weight), w64.sum(-1), **table)
    # Sums of 257 terms of either sign: the table's rtol, relative to the size of the terms.
    for got, want, terms in [
        (centred, want_centred, np.abs(centred_terms)),
        (total, extra.astype(np.float64).sum(-1), np.abs(extra.astype(np.float64))),
    ]:
        terms = np.where(np.isfinite(terms), terms, 0).sum(-1)
        np.testing.assert_array_less(np.abs(np.asarray(got) - want), table["rtol"] * terms + 1e-30)


@pytest.mark.parametrize("position", [0, 128, 256])
@pytest.mark.parametrize("value", [np.nan, np.inf])
def test_a_nan_or_inf_logit_anywhere_makes_the_row_nan(position, value):
    # Whatever order the reduction merges the parts in, the row's lse is NaN (the careful
    # path's exp(inf - inf) for +inf); the other rows are untouched.
    z = np.random.default_rng(1).normal(size=(3, 257)).astype(np.float32)
    z[1, position] = value
    row_max, sum_exp = jax.jit(_online.online_row_sums)(jnp.asarray(z))
    lse = np.asarray(_online._lse(row_max, jnp.log(sum_exp)))
    assert np.isnan(lse[1]) and np.isfinite(lse[[0, 2]]).all()


def test_eager_calls_choose_by_the_arrays_device():
    z = jnp.ones((2, 3))
    chosen = _platform.by_platform(lambda x: "cpu", lambda x: "accelerator", z)
    assert chosen == ("cpu" if z.devices().pop().platform == "cpu" else "accelerator")
