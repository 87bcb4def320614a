"""The fused distillation loss (``xent_jax.linear_distillation_loss``) against the materialised
divergences: values (NumPy float64 and ``xent_jax.kl_divergence`` / ``js_divergence`` on the
softmaxes of ``x @ w`` and the teacher logits), gradients (autodiff of the materialised loss in
float64), masks, reductions, block sizes that divide neither N nor V, bfloat16 inputs, the
teacher's missing gradient, temporary memory, and 8 simulated devices (a child process)."""

from __future__ import annotations

import functools
import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import xent_jax
from xent_jax import linear_distillation_loss as fused

ROOT = Path(__file__).resolve().parent.parent
N, D, DT, V = 37, 8, 6, 101  # prime N and V: no block size below divides them
DIVERGENCES = ("kl", "reverse_kl", "js")
# (block_size_tokens, block_size_vocab): default strip; vocabulary tiles whose last tile and
# token block overlap the previous one; a strip whose last token block overlaps.
BLOCKS = ((None, None), (8, 16), (5, None))
# One compilation per set of options (eager calls would compile op by op).
jfused = jax.jit(
    fused,
    static_argnames=(
        "divergence",
        "beta",
        "temperature",
        "ignore_index",
        "reduction",
        "block_size_tokens",
        "block_size_vocab",
    ),
)


def _data(seed: int = 0, dtype=np.float32):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(N, D)).astype(dtype)
    w = (rng.normal(size=(D, V)) * 0.7).astype(dtype)
    tx = rng.normal(size=(N, DT)).astype(dtype)
    tw = (rng.normal(size=(DT, V)) * 0.9).astype(dtype)
    return x, w, tx, tw


def _np_divergence(student, teacher, divergence, temperature=1.0, beta=0.5):
    """Per-token divergence in float64 NumPy from materialised logits."""
    s = np.asarray(student, np.float64) / temperature
    t = np.asarray(teacher, np.float64) / temperature
    lq = s - np.logaddexp.reduce(s, axis=-1, keepdims=True)
    lp = t - np.logaddexp.reduce(t, axis=-1, keepdims=True)
    q, p = np.exp(lq), np.exp(lp)
    with np.errstate(invalid="ignore", divide="ignore"):
        if divergence == "kl":
            return np.sum(np.where(p > 0, p * (lp - lq), 0), axis=-1)
        if divergence == "reverse_kl":
            return np.sum(np.where(q > 0, q * (lq - lp), 0), axis=-1)
        lm = np.logaddexp(np.log(beta) + lp, np.log1p(-beta) + lq)
        kl_pm = np.sum(np.where(p > 0, p * (lp - lm), 0), axis=-1)
        kl_qm = np.sum(np.where(q > 0, q * (lq - lm), 0), axis=-1)
        return beta * kl_pm + (1 - beta) * kl_qm


def _materialised(x, w, teacher_logits, divergence, temperature=1.0, beta=0.5):
    """Per-token divergence from xent_jax's dense functions on the materialised softmaxes."""
    q = jax.nn.softmax(x @ w / temperature)
    p = jax.nn.softmax(teacher_logits / temperature)
    if divergence == "kl":
        return xent_jax.kl_divergence(p, q)
    if divergence == "reverse_kl":
        return xent_jax.kl_divergence(q, p)
    if beta == 0.5:
        return xent_jax.js_divergence(p, q)
    m = beta * p + (1 - beta) * q
    return beta * xent_jax.kl_divergence(p, m) + (1 - beta) * xent_jax.kl_divergence(q, m)


def _reduce(values, reduction, keep=None, cotangent=None):
    keep = jnp.ones(values.shape, bool) if keep is None else keep
    values = jnp.where(keep, values, 0)
    if reduction == "none":
        return jnp.sum(values * cotangent)
    if reduction == "sum":
        return jnp.sum(values)
    return jnp.sum(values) / jnp.maximum(jnp.sum(keep), 1)


# ----------------------------------------------------------------------------------------------
# Values
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_values_match_materialised(divergence):
    """Per-token values at T = 1 and T = 2.5 for each block layout, teacher logits or hidden
    states, against float64 NumPy and xent_jax's dense divergences in float32."""
    x, w, tx, tw = _data(1)
    tl = tx @ tw
    beta = 0.3 if divergence == "js" else None
    opts = {"divergence": divergence, "beta": beta}
    layouts = [({"teacher_logits": tl}, blocks) for blocks in BLOCKS]
    layouts.append(({"teacher_x": tx, "teacher_w": tw}, (None, None)))
    for given, (bn, bv) in layouts:
        run = jax.jit(
            lambda t, given=given, bn=bn, bv=bv: fused(
                x, w, **given, **opts, temperature=t, block_size_tokens=bn, block_size_vocab=bv
            )
        )
        for temperature in (1.0, 2.5):
            got = run(temperature)
            assert got.dtype == jnp.float32 and got.shape == (N,)
            want = _np_divergence(x @ w, tl, divergence, temperature, beta or 0.5)
            np.testing.assert_allclose(got, want, rtol=2e-5, atol=2e-6)
            dense = _materialised(x, w, tl, divergence, temperature, beta or 0.5)
            np.testing.assert_allclose(got, dense, rtol=2e-5, atol=2e-6)


def test_js_at_one_half_is_the_symmetric_js_and_bounded():
    """Nearly disjoint distributions: JS close to log 2, never above it. (Against float64 NumPy:
    in float32, xent_jax.js_divergence on the materialised softmaxes gives +inf here, see
    below.)"""
    x, w, tx, tw = _data(2)
    got = jfused(x, w * 20, teacher_x=tx, teacher_w=-tw * 20, divergence="js")
    want = _np_divergence(x @ (w * 20), tx @ (-tw * 20), "js")
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    assert float(jnp.max(got)) <= np.log(2) * (1 + 1e-5)  # float32 rounding of the sums
    assert float(jnp.max(got)) > 0.69


def test_identical_teacher_gives_zero():
    x, w, _, _ = _data(3)
    for divergence in DIVERGENCES:
        got = jfused(x, w, teacher_logits=x @ w, divergence=divergence, temperature=0.7)
        np.testing.assert_allclose(got, 0, atol=2e-6)


def test_masked_teacher_classes():
    """-inf teacher logits have p = 0: forward KL and JS stay finite, reverse KL is +inf (the
    student puts mass where the teacher has none), as kl_divergence gives."""
    x, w, tx, tw = _data(4)
    tl = jnp.asarray(tx @ tw).at[:, ::3].set(-jnp.inf)
    for divergence in DIVERGENCES:
        got = jfused(x, w, teacher_logits=tl, divergence=divergence, block_size_vocab=16)
        want = _materialised(x, w, tl, divergence)
        np.testing.assert_allclose(got, want, rtol=2e-5, atol=2e-6)
        assert bool(jnp.all(jnp.isinf(got))) == (divergence == "reverse_kl")


# ----------------------------------------------------------------------------------------------
# Gradients, masks, reductions
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_gradients_match_materialised_float64(divergence):
    """Loss and gradients for x and w in float64 against autodiff of the materialised loss, for
    every reduction (``"none"`` through an arbitrary cotangent), with masks, at T != 1."""
    beta = 0.7 if divergence == "js" else None
    with jax.enable_x64(True):
        x, w, tx, tw = (jnp.asarray(a) for a in _data(5, np.float64))
        tl = tx @ tw
        rng = np.random.default_rng(6)
        labels = jnp.asarray(np.where(rng.random(N) < 0.3, -100, 1))
        where = jnp.asarray(rng.random(N) < 0.8)
        keep = (labels != -100) & where
        cot = jnp.asarray(rng.normal(size=N))
        # The reduced losses are sum(rows * weights): one compiled reference for all three.
        weights = {
            "none": jnp.where(keep, cot, 0),
            "sum": keep.astype(jnp.float64),
            "mean": keep / jnp.sum(keep),
        }

        @jax.jit
        def reference(x, w, weights):
            def loss(x, w):
                rows = _materialised(x, w, tl, divergence, 1.7, beta or 0.5)
                return jnp.sum(jnp.where(keep, rows, 0) * weights)

            return jax.value_and_grad(loss, argnums=(0, 1))(x, w)

        for (bn, bv), reduction in zip(BLOCKS, ("mean", "none", "sum"), strict=True):

            def loss(x, w, bn=bn, bv=bv, reduction=reduction):
                values = jfused(
                    x,
                    w,
                    teacher_logits=tl,
                    divergence=divergence,
                    beta=beta,
                    temperature=1.7,
                    labels=labels,
                    ignore_index=-100,
                    where=where,
                    reduction=reduction,
                    block_size_tokens=bn,
                    block_size_vocab=bv,
                )
                return jnp.sum(values * cot) if reduction == "none" else values

            got, got_grads = jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))(x, w)
            want, want_grads = reference(x, w, weights[reduction])
            assert got.dtype == jnp.float64
            np.testing.assert_allclose(got, want, rtol=1e-11, atol=1e-13)
            for g, r in zip(got_grads, want_grads, strict=True):
                assert g.dtype == jnp.float64
                np.testing.assert_allclose(g, r, rtol=1e-9, atol=1e-12)
            assert np.all(np.asarray(got_grads[0])[np.asarray(~keep)] == 0)


def test_per_token_mask_and_batch_dims():
    """[B, T, D] inputs with a [B, T] mask: masked tokens give exactly 0, the mean leaves them
    out, float32 against the float64 reference."""
    x, w, tx, tw = _data(7)
    x3, tl3 = x[:36].reshape(4, 9, D), (tx @ tw)[:36].reshape(4, 9, V)
    where = np.arange(36).reshape(4, 9) % 4 != 0
    rows = jfused(x3, w, teacher_logits=tl3, where=where, divergence="reverse_kl")
    assert rows.shape == (4, 9)
    assert np.all(np.asarray(rows)[~where] == 0)
    want = _np_divergence(x3 @ w, tl3, "reverse_kl")
    np.testing.assert_allclose(np.asarray(rows)[where], want[where], rtol=2e-5, atol=2e-6)
    mean = jfused(x3, w, teacher_logits=tl3, where=where, divergence="reverse_kl", reduction="mean")
    np.testing.assert_allclose(mean, want[where].mean(), rtol=2e-5)
    total = jfused(x3, w, teacher_logits=tl3, where=where, divergence="reverse_kl", reduction="sum")
    np.testing.assert_allclose(total, want[where].sum(), rtol=2e-5)


@pytest.mark.parametrize("blocks", [(None, None), (8, 16)])
def test_nothing_counts_gives_zero_not_nan(blocks):
    x, w, tx, tw = _data(8)
    labels = jnp.full((N,), -100)

    def loss(x, w):
        return jfused(
            x,
            w,
            teacher_x=tx,
            teacher_w=tw,
            labels=labels,
            ignore_index=-100,
            reduction="mean",
            block_size_tokens=blocks[0],
            block_size_vocab=blocks[1],
        )

    value, grads = jax.value_and_grad(loss, argnums=(0, 1))(x, w)
    assert float(value) == 0.0
    for g in grads:
        assert np.all(np.asarray(g) == 0)


def test_teacher_gets_no_gradient_and_hidden_equals_logits():
    x, w, tx, tw = _data(9)

    def by_hidden(x, w, tx, tw):
        return jfused(x, w, teacher_x=tx, teacher_w=tw, divergence="js", reduction="mean")

    def by_logits(x, w, tl):
        return jfused(x, w, teacher_logits=tl, divergence="js", reduction="mean")

    hidden, (dx, dw, dtx, dtw) = jax.value_and_grad(by_hidden, argnums=(0, 1, 2, 3))(x, w, tx, tw)
    logits, (dx2, dw2, dtl) = jax.value_and_grad(by_logits, argnums=(0, 1, 2))(x, w, tx @ tw)
    np.testing.assert_allclose(hidden, logits, rtol=1e-6)
    np.testing.assert_allclose(dx, dx2, rtol=1e-5, atol=1e-8)
    np.testing.assert_allclose(dw, dw2, rtol=1e-5, atol=1e-8)
    for g in (dtx, dtw, dtl):
        assert np.all(np.asarray(g) == 0)
    assert float(jnp.max(jnp.abs(dx))) > 0


def test_temperature_may_be_traced_but_not_differentiated():
    x, w, tx, tw = _data(10)
    tl = tx @ tw

    @jax.jit
    def at(temperature):
        return fused(x, w, teacher_logits=tl, temperature=temperature, reduction="sum")

    want = _np_divergence(x @ w, tl, "kl", 3.0).sum()
    np.testing.assert_allclose(at(3.0), want, rtol=2e-5)
    with pytest.raises(TypeError, match="no derivative with respect to temperature"):
        jax.grad(at)(3.0)


def test_bfloat16_inputs_compute_in_float32():
    """bfloat16 x, w and teacher: the loss is float32 and matches float64 on the same
    (bfloat16-rounded) numbers to float32 rounding; the gradients come back in bfloat16."""
    x, w, tx, tw = (jnp.asarray(a, jnp.bfloat16) for a in _data(11))
    f64 = lambda a: np.asarray(a.astype(jnp.float32), np.float64)
    for divergence in DIVERGENCES:
        got = jfused(x, w, teacher_x=tx, teacher_w=tw, divergence=divergence, temperature=2.0)
        assert got.dtype == jnp.float32
        want = _np_divergence(f64(x) @ f64(w), f64(tx) @ f64(tw), divergence, 2.0)
        np.testing.assert_allclose(got, want, rtol=2e-5, atol=2e-6)
    loss = lambda x, w: jfused(x, w, teacher_x=tx, teacher_w=tw, reduction="mean")
    dx, dw = jax.grad(loss, argnums=(0, 1))(x, w)
    assert dx.dtype == jnp.bfloat16 and dw.dtype == jnp.bfloat16
    ref = lambda x, w: jnp.mean(_materialised(x, w, tx.astype(jnp.float32) @ tw, "kl"))
    rx, rw = jax.jit(jax.grad(ref, argnums=(0, 1)))(x.astype(jnp.float32), w.astype(jnp.float32))
    np.testing.assert_allclose(dx.astype(jnp.float32), rx, rtol=2e-2, atol=1e-4)
    np.testing.assert_allclose(dw.astype(jnp.float32), rw, rtol=2e-2, atol=1e-4)


# ----------------------------------------------------------------------------------------------
# Errors
# ----------------------------------------------------------------------------------------------


def test_errors_name_the_argument():
    x, w, tx, tw = _data(12)
    tl = tx @ tw
    with pytest.raises(ValueError, match="either as teacher_logits"):
        fused(x, w)
    with pytest.raises(ValueError, match="either as teacher_logits"):
        fused(x, w, teacher_logits=tl, teacher_x=tx, teacher_w=tw)
    with pytest.raises(ValueError, match="go together"):
        fused(x, w, teacher_x=tx)
    with pytest.raises(ValueError, match="teacher_logits must have the shape"):
        fused(x, w, teacher_logits=tl[:, :-1])
    with pytest.raises(ValueError, match="teacher_w must have shape"):
        fused(x, w, teacher_x=tx, teacher_w=tw[:, :-1])
    with pytest.raises(ValueError, match="divergence must be one of"):
        fused(x, w, teacher_logits=tl, divergence="jsd")
    with pytest.raises(ValueError, match=r"beta must be in \(0, 1\)"):
        fused(x, w, teacher_logits=tl, divergence="js", beta=0.0)
    with pytest.raises(ValueError, match="takes none"):
        fused(x, w, teacher_logits=tl, divergence="kl", beta=0.5)
    with pytest.raises(ValueError, match="temperature must be > 0"):
        fused(x, w, teacher_logits=tl, temperature=0.0)
    with pytest.raises(ValueError, match="together with ignore_index"):
        fused(x, w, teacher_logits=tl, labels=np.zeros(N, np.int32))
    with pytest.raises(ValueError, match="reduction must be one of"):
        fused(x, w, teacher_logits=tl, reduction="batchmean")
    with pytest.raises(ValueError, match="block_size_vocab must be a positive integer"):
        fused(x, w, teacher_logits=tl, block_size_vocab=0)


def test_empty_batch():
    _, w, _, tw = _data(13)
    x0, tx0 = jnp.zeros((0, D)), jnp.zeros((0, DT))
    assert fused(x0, w, teacher_x=tx0, teacher_w=tw).shape == (0,)
    assert float(fused(x0, w, teacher_x=tx0, teacher_w=tw, reduction="mean")) == 0.0


# ----------------------------------------------------------------------------------------------
# Memory
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("divergence", "reduction"), [("kl", "mean"), ("js", "none")])
def test_temporary_memory_far_below_one_logits_array(divergence, reduction):
    """Loss + gradients at N=2048, V=8192: the compiled function's temporaries stay below a
    sixth of one N x V float32 array (the materialised loss needs about two)."""
    n, d, v = 2048, 64, 8192
    spec = lambda *shape: jax.ShapeDtypeStruct(shape, jnp.float32)

    def grads(x, w, tl):
        def loss(x, w):
            values = fused(x, w, teacher_logits=tl, divergence=divergence, reduction=reduction)
            return jnp.sum(values)

        return jax.grad(loss, argnums=(0, 1))(x, w)

    compiled = jax.jit(grads).lower(spec(n, d), spec(d, v), spec(n, v)).compile()
    temp = compiled.memory_analysis().temp_size_in_bytes
    assert temp < n * v * 4 / 6, temp / (n * v * 4)


# ----------------------------------------------------------------------------------------------
# 8 simulated devices
# ----------------------------------------------------------------------------------------------


@functools.cache
def child_results() -> dict:
    env = dict(os.environ)
    env["XLA_FLAGS"] = (
        env.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
    ).strip()
    env["JAX_PLATFORMS"] = "cpu"
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    proc = subprocess.run(
        [sys.executable, "-m", "tests.distill_child"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    if proc.returncode != 0:
        pytest.fail(f"distill_child failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_sharded_matches_single_device():
    results = child_results()
    assert results["device_count"] == 8
    assert len(results["cases"]) >= 6
    for name, case in results["cases"].items():
        assert case["max_rel_err"] <= 2e-5, (name, case["max_rel_err"])
        assert case["value"] != 0.0, name


def test_sharded_gathers_no_logits():
    """Only per-token statistics and the gradients of x and w cross devices: no all-gather, and
    no collective as large as an eighth of the N x V logits."""
    results = child_results()
    n, _, v = results["shape"]
    for name, case in results["cases"].items():
        assert case["collectives"], name  # the vocabulary is split: statistics are combined
        for kind, sizes in case["collectives"]:
            assert kind != "all-gather", (name, kind, sizes)
            assert all(s < n * v // 8 for s in sizes), (name, kind, sizes)
