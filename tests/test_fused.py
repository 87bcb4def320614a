"""The fused linear + cross-entropy against the materialised loss
``softmax_cross_entropy_with_integer_labels(x @ w + bias, labels, ...)``: values and gradients
for x, w and bias with every option, every reduction and block sizes that do and do not divide
the shapes; bfloat16 inputs; aux outputs; jit / vmap; no N x V buffer in the compiled program;
and a tiny Flax NNX language-model head trained with both losses."""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import xent_jax
from tests import reference
from tests.tolerances import assert_close, tolerance
from xent_jax import LinearCrossEntropyAux, linear_softmax_cross_entropy_with_integer_labels

fused = linear_softmax_cross_entropy_with_integer_labels
materialised = xent_jax.softmax_cross_entropy_with_integer_labels

# Ragged on purpose: 37 tokens, 53 classes; (8, 16) blocks divide neither.
N, D, V = 37, 8, 53
IGNORE = -100
REL = 1e-5  # the bar for float32: max |fused - materialised| / max |materialised|
BLOCKS = {
    "default": {},
    "tiles": {"block_size_tokens": 8, "block_size_vocab": 16},
    "strip": {"block_size_tokens": 6, "block_size_vocab": V},
}


def rel_err(actual, expected) -> float:
    a, e = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
    assert a.shape == e.shape, (a.shape, e.shape)
    finite = np.isfinite(e)
    np.testing.assert_array_equal(np.isfinite(a), finite)
    scale = np.max(np.abs(e[finite]), initial=0.0)
    diff = np.max(np.abs(a[finite] - e[finite]), initial=0.0)
    return float(diff / scale) if scale else float(diff)


def _data(seed=0, n=N, d=D, v=V, batch=None):
    rng = np.random.default_rng(seed)
    shape = (n,) if batch is None else batch
    x = rng.normal(size=(*shape, d)).astype(np.float32)
    w = (rng.normal(size=(d, v)) / np.sqrt(d) * 3).astype(np.float32)
    b = rng.normal(size=(v,)).astype(np.float32)
    y = rng.integers(0, v, size=shape).astype(np.int32)
    return x, w, b, y


def _options(name: str, y: np.ndarray, rng: np.random.Generator) -> tuple[dict, np.ndarray]:
    """Options of one scenario (and labels adapted to it)."""
    y = y.copy()
    if name == "plain":
        return {}, y
    if name == "example_mask":
        return {"where": rng.random(y.shape) < 0.7}, y
    if name == "class_mask_shared":
        mask = rng.random(V) < 0.8
        mask[y] = True  # labels stay available
        return {"where": mask[None, :]}, y
    if name == "class_mask_rows":
        mask = rng.random((*y.shape, V)) < 0.8
        np.put_along_axis(mask, y[..., None], True, axis=-1)
        mask[3] = False  # a fully masked row: loss 0, gradient 0, not in the mean
        return {"where": mask}, y
    if name == "ignore_index":
        y[rng.random(y.shape) < 0.3] = IGNORE
        return {"ignore_index": IGNORE}, y
    if name == "label_smoothing":
        return {"label_smoothing": 0.1}, y
    if name == "class_weights":
        return {"class_weights": rng.uniform(0.2, 2.0, V).astype(np.float32)}, y
    if name == "z_loss":
        return {"z_loss": 1e-2}, y
    if name == "logit_softcap":
        return {"logit_softcap": 2.0}, y
    if name == "all":
        mask = rng.random(V) < 0.9
        mask[y] = True
        y[rng.random(y.shape) < 0.2] = IGNORE
        return {
            "where": mask[None, :],
            "ignore_index": IGNORE,
            "label_smoothing": 0.2,
            "class_weights": rng.uniform(0.2, 2.0, V).astype(np.float32),
            "z_loss": 1e-3,
            "logit_softcap": 3.0,
        }, y
    if name == "all_rows_mask":
        mask = rng.random((*y.shape, V)) < 0.7
        y = np.where(rng.random(y.shape) < 0.2, IGNORE, y)
        np.put_along_axis(mask, np.maximum(y, 0)[..., None], True, axis=-1)
        mask[5] = False
        return {
            "where": mask,
            "ignore_index": IGNORE,
            "label_smoothing": 0.1,
            "class_weights": rng.uniform(0.2, 2.0, V).astype(np.float32),
            "z_loss": 1e-2,
        }, y
    raise ValueError(name)


SCENARIOS = [
    "plain",
    "example_mask",
    "class_mask_shared",
    "class_mask_rows",
    "ignore_index",
    "label_smoothing",
    "class_weights",
    "z_loss",
    "logit_softcap",
    "all",
    "all_rows_mask",
]


def _all_reductions(loss_fn, x, w, b, y, cotangent):
    """{reduction: (loss, grads of sum(cotangent * loss) or of the scalar loss)} in one jit."""

    def run(x, w, b):
        out = {}
        for reduction in ("none", "sum", "mean"):
            value, vjp = jax.vjp(lambda *a, r=reduction: loss_fn(*a, y, r), x, w, b)
            out[reduction] = (value, vjp(cotangent if reduction == "none" else jnp.ones(())))
        return out

    return jax.jit(run)(x, w, b)


CASES = [(s, "default") for s in SCENARIOS] + [(s, "tiles") for s in SCENARIOS]
CASES += [(s, "strip") for s in ("plain", "all", "all_rows_mask")]


@pytest.mark.parametrize(("scenario", "blocks"), CASES)
def test_matches_materialised(scenario, blocks):
    x, w, b, y = _data(seed=SCENARIOS.index(scenario))
    rng = np.random.default_rng(123)
    opts, y = _options(scenario, y, rng)
    cotangent = rng.normal(size=y.shape).astype(np.float32)

    def fused_fn(x, w, b, y, reduction):
        return fused(x, w, y, bias=b, reduction=reduction, **opts, **BLOCKS[blocks])

    def ref_fn(x, w, b, y, reduction):
        return materialised(x @ w + b, y, reduction=reduction, **opts)

    got = _all_reductions(fused_fn, x, w, b, y, cotangent)
    want = _all_reductions(ref_fn, x, w, b, y, cotangent)
    for reduction in ("none", "sum", "mean"):
        (value_f, grads_f), (value_r, grads_r) = got[reduction], want[reduction]
        assert value_f.dtype == jnp.float32
        assert rel_err(value_f, value_r) <= REL, (reduction, "loss")
        for name, gf, gr in zip(("x", "w", "bias"), grads_f, grads_r, strict=True):
            assert gf.dtype == gr.dtype
            assert rel_err(gf, gr) <= REL, (reduction, name)
    # An independent float64 NumPy reference for the per-token values.
    with np.errstate(divide="ignore", invalid="ignore"):  # fully masked rows in the reference
        numpy_ref = reference.softmax_cross_entropy_with_integer_labels(
            np.float64(x) @ np.float64(w) + np.float64(b), y, **opts
        )
    assert rel_err(got["none"][0], numpy_ref) <= REL


def test_multi_dim_batch_and_no_bias():
    x, w, _, y = _data(batch=(3, 5))

    def run(loss_fn):
        values = loss_fn(x, w, "none")
        grads = jax.grad(lambda x, w: loss_fn(x, w, "mean"), (0, 1))(x, w)
        return values, grads

    want = jax.jit(lambda: run(lambda x, w, r: materialised(x @ w, y, reduction=r)))()
    for blocks in BLOCKS.values():
        got = jax.jit(
            lambda blocks=blocks: run(lambda x, w, r: fused(x, w, y, reduction=r, **blocks))
        )()
        assert got[0].shape == (3, 5)
        for a, e in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
            assert rel_err(a, e) <= REL


@pytest.mark.parametrize("blocks", ["default", "tiles"])
def test_masked_vocabulary_through_bias_and_invalid_labels(blocks):
    """-inf bias entries mask classes; labels out of range give NaN for their token only, with a
    zero gradient row, exactly like the materialised loss."""
    x, w, b, y = _data(seed=7)
    b = b.copy()
    b[[2, 5, 11]] = -np.inf
    y = np.where(np.isin(y, [2, 5, 11]), 0, y)
    y[4], y[9] = V + 3, -1

    def run(loss_fn):
        out = []
        for eps in (0.0, 0.1):
            values = loss_fn(x, w, b, eps)
            grads = jax.grad(lambda *a, e=eps: jnp.nansum(loss_fn(*a, e)), (0, 1, 2))(x, w, b)
            out.append((values, grads))
        return out

    got = jax.jit(
        lambda: run(lambda x, w, b, e: fused(x, w, y, bias=b, label_smoothing=e, **BLOCKS[blocks]))
    )()
    want = jax.jit(lambda: run(lambda x, w, b, e: materialised(x @ w + b, y, label_smoothing=e)))()
    for (values_f, grads_f), (values_r, grads_r) in zip(got, want, strict=True):
        assert np.isnan(values_f[4]) and np.isnan(values_f[9])
        assert rel_err(values_f, values_r) <= REL
        for a, e in zip(grads_f, grads_r, strict=True):
            assert np.all(np.isfinite(a))
            assert rel_err(a, e) <= REL
        np.testing.assert_array_equal(grads_f[0][4], 0)


@pytest.mark.parametrize("blocks", ["default", "tiles"])
def test_bfloat16_inputs_accumulate_in_float32(blocks):
    x, w, b, y = _data(seed=3)
    xb, wb, bb = (jnp.asarray(a, jnp.bfloat16) for a in (x, w, b))
    # The float32 reference sees the same (bfloat16-representable) numbers.
    x32, w32, b32 = (a.astype(jnp.float32) for a in (xb, wb, bb))

    def run(loss_fn, x, w, b):
        return loss_fn(x, w, b, "none"), jax.grad(
            lambda *a: loss_fn(*a, "mean"), argnums=(0, 1, 2)
        )(x, w, b)

    got, gf = jax.jit(
        lambda *a: run(lambda x, w, b, r: fused(x, w, y, bias=b, reduction=r, **BLOCKS[blocks]), *a)
    )(xb, wb, bb)
    want, gr = jax.jit(
        lambda *a: run(lambda x, w, b, r: materialised(x @ w + b, y, reduction=r), *a)
    )(x32, w32, b32)
    assert got.dtype == jnp.float32
    assert rel_err(got, want) <= REL
    for a, e in zip(gf, gr, strict=True):
        assert a.dtype == jnp.bfloat16
        # Only the final rounding to bfloat16 separates them.
        assert rel_err(a, e) <= tolerance(jnp.bfloat16)["rtol"]


def test_float64_under_x64():
    x, w, b, y = _data(seed=4)
    with jax.enable_x64(True):
        x64, w64, b64 = (jnp.asarray(a, jnp.float64) for a in (x, w, b))

        def run(loss_fn):
            values = loss_fn(x64, w64, "none")
            grad = jax.grad(lambda w: loss_fn(x64, w, "mean"))(w64)
            return values, grad

        got = jax.jit(
            lambda: run(
                lambda x, w, r: fused(
                    x, w, y, bias=b64, label_smoothing=0.1, reduction=r, **BLOCKS["tiles"]
                )
            )
        )()
        want = jax.jit(
            lambda: run(
                lambda x, w, r: materialised(x @ w + b64, y, label_smoothing=0.1, reduction=r)
            )
        )()
        for a, e in zip(got, want, strict=True):
            assert a.dtype == jnp.float64
            assert rel_err(a, e) <= 1e-12


@pytest.mark.parametrize("blocks", list(BLOCKS))
def test_aux_outputs(blocks):
    x, w, b, y = _data(seed=5)
    y = y.copy()
    y[:10] = np.argmax(x[:10] @ w + b, axis=-1)  # some correct predictions
    y[-3:] = IGNORE
    mask = np.ones(V, bool)
    mask[[0, 7]] = False
    opts = {"bias": b, "where": mask[None, :], "ignore_index": IGNORE, "logit_softcap": 4.0}
    loss, aux = jax.jit(
        lambda x, w: fused(x, w, y, reduction="mean", return_aux=True, **opts, **BLOCKS[blocks])
    )(x, w)
    assert isinstance(aux, LinearCrossEntropyAux)
    assert (
        rel_err(
            loss,
            materialised(
                x @ w + b, y, reduction="mean", **{k: v for k, v in opts.items() if k != "bias"}
            ),
        )
        <= REL
    )
    z = 4.0 * np.tanh((x @ w + b) / 4.0)
    z = np.where(mask, z, -np.inf)
    valid = y != IGNORE
    lse = lambda logits: jnp.where(valid, jax.nn.logsumexp(logits, axis=-1), 0)
    np.testing.assert_allclose(aux.logsumexp, lse(z), rtol=1e-6)
    np.testing.assert_array_equal(aux.argmax, np.argmax(z, axis=-1))
    np.testing.assert_allclose(
        aux.accuracy, np.mean(np.argmax(z, axis=-1)[valid] == y[valid]), rtol=1e-6
    )
    # The logsumexp is differentiable: its gradient is the materialised one.
    g_aux = jax.jit(
        jax.grad(
            lambda w: fused(x, w, y, reduction="mean", return_aux=True, **opts)[1].logsumexp.sum()
        )
    )(w)
    capped = lambda w: jnp.where(mask, 4.0 * jnp.tanh((x @ w + b) / 4.0), -jnp.inf)
    g_ref = jax.grad(lambda w: lse(capped(w)).sum())(w)
    assert_close(g_aux, g_ref, jnp.float32)


def test_jit_matches_eager_and_vmap_matches_loop():
    x, w, b, y = _data(batch=(3, 11))
    kw = {"bias": b, "label_smoothing": 0.1, "block_size_tokens": 4, "block_size_vocab": 16}
    eager = fused(x[0], w, y[0], **kw)
    jitted = jax.jit(lambda x, w, y: fused(x, w, y, **kw))(x[0], w, y[0])
    np.testing.assert_allclose(jitted, eager, rtol=1e-6)

    def per_row(w, x, y):
        return fused(x, w, y, reduction="mean", **kw)

    def per_row_ref(w, x, y):
        return materialised(x @ w + b, y, label_smoothing=0.1, reduction="mean")

    both = jax.value_and_grad(per_row, argnums=(0, 1))
    batched = jax.jit(jax.vmap(both, (None, 0, 0)))(w, x, y)
    single = jax.jit(both)
    looped = [single(w, x[i], y[i]) for i in range(3)]
    looped = jax.tree.map(lambda *a: jnp.stack(a), *looped)
    for a, e in zip(jax.tree.leaves(batched), jax.tree.leaves(looped), strict=True):
        np.testing.assert_allclose(a, e, rtol=1e-5, atol=1e-7)
    # vmap of the gradient for w (per-example weight gradients) against the materialised loss.
    ref = jax.jit(jax.vmap(jax.value_and_grad(per_row_ref, argnums=(0, 1)), (None, 0, 0)))(w, x, y)
    for a, e in zip(jax.tree.leaves(batched), jax.tree.leaves(ref), strict=True):
        assert rel_err(a, e) <= REL


def _buffer_shapes(hlo_text: str) -> set[tuple[int, ...]]:
    shapes = set()
    for dims in re.findall(r"(?:f32|bf16|f16|f64|pred|s32)\[([0-9,]*)\]", hlo_text):
        if dims:
            shapes.add(tuple(int(d) for d in dims.split(",")))
    return shapes


@pytest.mark.parametrize("reduction", ["none", "mean"])
def test_compiled_program_never_holds_the_logits(reduction):
    n, d, v = 512, 16, 1024
    x, w, _, y = _data(n=n, d=d, v=v)

    def loss(x, w):
        out = fused(x, w, y, reduction=reduction, block_size_tokens=128, block_size_vocab=256)
        return out.sum()

    hlo = jax.jit(jax.value_and_grad(loss, (0, 1))).lower(x, w).compile().as_text()
    big = [s for s in _buffer_shapes(hlo) if int(np.prod(s)) >= n * v // 2]
    assert not big, big
    ref = jax.jit(jax.value_and_grad(lambda x, w: materialised(x @ w, y).sum(), (0, 1)))
    assert (n, v) in _buffer_shapes(ref.lower(x, w).compile().as_text())


def test_errors_name_the_argument():
    x, w, b, y = _data()
    with pytest.raises(ValueError, match="w must have shape"):
        fused(x, w.T, y)
    with pytest.raises(ValueError, match="labels must have the shape"):
        fused(x, w, y[:-1])
    with pytest.raises(TypeError, match="labels"):
        fused(x, w, y.astype(np.float32))
    with pytest.raises(ValueError, match="bias"):
        fused(x, w, y, bias=b[:-1])
    with pytest.raises(ValueError, match="class_weights"):
        fused(x, w, y, class_weights=b[:-1])
    with pytest.raises(ValueError, match="reduction"):
        fused(x, w, y, reduction="avg")
    with pytest.raises(ValueError, match="label_smoothing"):
        fused(x, w, y, label_smoothing=1.0)
    with pytest.raises(ValueError, match="block_size_vocab"):
        fused(x, w, y, block_size_vocab=0)
    with pytest.raises(TypeError, match="logit_softcap must be a Python number"):
        jax.jit(lambda s: fused(x, w, y, logit_softcap=s))(5.0)
    with pytest.raises(TypeError, match="ignore_index must be an integer"):
        fused(x, w, y, ignore_index=-100.5)
    with pytest.raises(ValueError, match="precision must be"):
        fused(x, w, y, precision="exact")


def _dot_precisions(jaxpr) -> list:
    """The ``precision`` of every dot_general in a jaxpr, nested jaxprs (loops, custom VJPs)
    included."""
    found = []
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "dot_general":
            found.append(eqn.params["precision"])
        for param in eqn.params.values():
            for sub in param if isinstance(param, (list, tuple)) else (param,):
                inner = getattr(sub, "jaxpr", sub)
                if hasattr(inner, "eqns"):
                    found.extend(_dot_precisions(inner))
    return found


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_precision_reaches_every_product(reduction):
    x, w, _, y = _data()

    # "mean" takes the single-pass path (loss and gradients in one pass), "none" the two-pass
    # one: both must carry the precision into x @ w and the two gradient products.
    def dots(**kw):
        loss = lambda x, w: jnp.sum(fused(x, w, y, reduction=reduction, **kw))
        return _dot_precisions(jax.make_jaxpr(jax.grad(loss, argnums=(0, 1)))(x, w).jaxpr)

    highest = (jax.lax.Precision.HIGHEST, jax.lax.Precision.HIGHEST)
    # Inside a reduced-precision default: the explicit argument wins, and without it the
    # products follow the default exactly as a plain x @ w does.
    with jax.default_matmul_precision("bfloat16"):
        chosen = dots(precision="highest")
        default = dots()
        plain = _dot_precisions(jax.make_jaxpr(jnp.dot)(x, w).jaxpr)
    assert len(chosen) >= 3 and all(p == highest for p in chosen), chosen
    assert plain[0] != highest
    assert len(default) == len(chosen) and all(p == plain[0] for p in default), default


def test_empty_batch():
    x, w, _, _ = _data()
    assert fused(x[:0], w, np.zeros((0,), np.int32)).shape == (0,)
    assert float(fused(x[:0], w, np.zeros((0,), np.int32), reduction="mean")) == 0.0


# ----------------------------------------------------------------------------------------------
# A tiny Flax NNX language model trained with the fused loss and with the materialised loss.
# ----------------------------------------------------------------------------------------------


def test_flax_nnx_lm_head_trains_like_the_materialised_loss():
    from flax import nnx

    vocab, dim, seq, batch, steps = 97, 16, 12, 8, 8

    class TinyLM(nnx.Module):
        def __init__(self, rngs: nnx.Rngs):
            self.embed = nnx.Embed(vocab, dim, rngs=rngs)
            self.mix = nnx.Linear(dim, dim, rngs=rngs)
            self.head = nnx.Param(jax.random.normal(rngs.params(), (dim, vocab)) / np.sqrt(dim))
            self.head_bias = nnx.Param(jnp.zeros((vocab,)))

        def hidden(self, tokens):
            return jnp.tanh(self.mix(self.embed(tokens)))

    def fused_loss(model, tokens, targets):
        return fused(
            model.hidden(tokens),
            model.head[...],
            targets,
            bias=model.head_bias[...],
            reduction="mean",
            block_size_tokens=32,
            block_size_vocab=40,
        )

    def materialised_loss(model, tokens, targets):
        logits = model.hidden(tokens) @ model.head[...] + model.head_bias[...]
        return optax.softmax_cross_entropy_with_integer_labels(logits, targets).mean()

    rng = np.random.default_rng(0)
    tokens = rng.integers(0, vocab, size=(batch, seq))
    targets = (tokens * 3 + 1) % vocab  # a learnable next-token rule

    def train(loss_fn):
        model = TinyLM(nnx.Rngs(0))
        optimizer = nnx.Optimizer(model, optax.adam(3e-2), wrt=nnx.Param)

        @nnx.jit
        def step(model, optimizer, tokens, targets):
            loss, grads = nnx.value_and_grad(loss_fn)(model, tokens, targets)
            optimizer.update(model, grads)
            return loss

        return np.array([float(step(model, optimizer, tokens, targets)) for _ in range(steps)])

    curve_fused = train(fused_loss)
    curve_materialised = train(materialised_loss)
    assert curve_fused[-1] < 0.8 * curve_fused[0]
    np.testing.assert_allclose(curve_fused, curve_materialised, rtol=1e-4)


@pytest.mark.parametrize("blocks", list(BLOCKS))
def test_neg_inf_bias_with_logit_softcap_keeps_gradients_finite(blocks):
    # A -inf bias masks its class; through the soft cap it stays -inf, and its derivative there
    # must not turn the zero probability into 0 * -inf = NaN.
    x, w, b, y = _data(seed=9)
    b = b.copy()
    b[[3, 20]] = -np.inf
    y = np.where(np.isin(y, [3, 20]), 0, y)
    opts = {"logit_softcap": 4.0, "label_smoothing": 0.1}

    def fused_loss(x, w, b):
        return fused(x, w, y, bias=b, reduction="mean", **opts, **BLOCKS[blocks])

    def reference(x, w, b):
        return materialised(x @ w + b, y, reduction="mean", **opts)

    value, grads = jax.value_and_grad(fused_loss, argnums=(0, 1, 2))(x, w, b)
    ref_value, ref_grads = jax.value_and_grad(reference, argnums=(0, 1, 2))(x, w, b)
    assert rel_err(value, ref_value) <= REL
    for got, expected in zip(grads, ref_grads, strict=True):
        assert np.all(np.isfinite(np.asarray(got)))
        assert rel_err(got, expected) <= REL
    np.testing.assert_array_equal(grads[2][np.array([3, 20])], 0.0)
