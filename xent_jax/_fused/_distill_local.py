r"""Per-device arithmetic and loops of the fused distillation loss (inside ``shard_map`` on a mesh).

Notation, per token: student logits :math:`s = x W / T`, teacher logits :math:`t` (given, or
:math:`x_t W_t`) divided by :math:`T`; :math:`q = \operatorname{softmax}(s)` (student),
:math:`p = \operatorname{softmax}(t)` (teacher); ``lse_s`` / ``lse_t`` their log-normalisers.

Tokens go in blocks of ``bn`` rows and the (local) vocabulary in tiles of ``bv`` classes. A
block or tile that would overrun its axis starts earlier instead (``start = min(i * bn, n - bn)``)
and the rows / classes it shares with the previous one are masked out: nothing is ever padded,
so not even the teacher logits are copied.

* **strip** (``kv == 1``): a block sees the whole local vocabulary, so both logsumexps and the
  divergence are final in one visit (after a ``pmax`` / ``psum`` over the vocabulary shards),
  and with ``reduction`` ``"sum"`` / ``"mean"`` the gradients are formed in the same visit.
* **tiles** (``kv > 1``): per block, one loop over the tiles for the two online logsumexps,
  then one for the divergence with the logsumexps known (a plain sum of exact terms, no
  rescaling).

The backward pass recomputes every tile from the saved per-token ``lse_s``, ``lse_t`` and
``center`` (the per-token constant of the reverse-KL / JS gradients).
"""

from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from xent_jax._fused._blocks import fori
from xent_jax._fused._local import safe_divide

DIVERGENCES = ("kl", "reverse_kl", "js")


@dataclasses.dataclass(frozen=True)
class DistillPlan:
    """Everything static about one call (sizes local to a device)."""

    divergence: str  # "kl" | "reverse_kl" | "js"
    reduction: str  # "none" | "sum" | "mean"
    n: int  # local tokens
    bn: int  # tokens per block
    kn: int  # token blocks
    v: int  # local classes
    bv: int  # classes per tile
    kv: int  # vocabulary tiles
    cdtype: Any  # compute dtype (float32, or float64 for float64 inputs)
    precision: Any = None  # jax.lax.Precision of the products (None: JAX's default)
    mesh: Any = None  # shard_map over this mesh when not None
    batch_spec: tuple = ()  # PartitionSpec entries of the batch dims
    data_axes: tuple[str, ...] = ()
    vocab_axes: tuple[str, ...] = ()


class Teacher(NamedTuple):
    """Inputs that get no gradient: the teacher (logits, or hidden states and weights), the
    token mask and the two scalar options."""

    x: jax.Array | None  # [..., Dt] teacher hidden states
    w: jax.Array | None  # [Dt, V] teacher output projection
    logits: jax.Array | None  # [..., V] teacher logits
    keep: jax.Array  # [...] bool: the token counts
    beta: jax.Array  # scalar, JS mixture weight of the teacher
    temperature: jax.Array  # scalar


class _Local(NamedTuple):
    """One device's arrays, tokens flattened."""

    x: jax.Array  # [n, D]
    xt: jax.Array | None  # [D, n] (only when the weight gradient is needed)
    w: jax.Array  # [D, v]
    tx: jax.Array | None  # [n, Dt]
    tw: jax.Array | None  # [Dt, v]
    tl: jax.Array | None  # [n, v]
    keep: jax.Array  # [n] bool
    beta: jax.Array
    temperature: jax.Array


def _local(plan: DistillPlan, x, w, teacher: Teacher, need_xt: bool) -> _Local:
    n = plan.n
    x2 = x.reshape(n, x.shape[-1])
    return _Local(
        x=x2,
        # Transposed once, outside the loops: XLA:CPU runs a product whose left operand
        # contracts its first axis on a much slower path.
        xt=x2.T if need_xt else None,
        w=w,
        tx=None if teacher.x is None else teacher.x.reshape(n, teacher.x.shape[-1]),
        tw=teacher.w,
        tl=None if teacher.logits is None else teacher.logits.reshape(n, plan.v),
        keep=teacher.keep.reshape(n),
        beta=teacher.beta.astype(plan.cdtype),
        temperature=teacher.temperature.astype(plan.cdtype),
    )


# ----------------------------------------------------------------------------------------------
# Blocks and tiles
# ----------------------------------------------------------------------------------------------


def _span(i, count: int, size: int, length: int):
    """(start, fresh) of block ``i`` of ``count`` blocks of ``size`` over ``length`` entries.

    ``fresh`` marks the entries no earlier block covered (``None``: all of them).
    """
    if count == 1:
        return 0, None
    if length % size == 0:
        return i * size, None
    start = jnp.minimum(i * size, length - size)
    return start, start + jnp.arange(size) >= i * size


def _slice(array, start, size: int, axis: int, whole: bool):
    """``size`` entries of ``array`` along ``axis`` from ``start`` (the array itself if whole)."""
    if whole:
        return array
    return lax.dynamic_slice_in_dim(array, start, size, axis=axis)


def _add_slice(array, value, start, axis: int, whole: bool):
    """``array`` with ``value`` added to its entries from ``start`` along ``axis``."""
    if whole:
        return array + value
    old = lax.dynamic_slice_in_dim(array, start, value.shape[axis], axis=axis)
    return lax.dynamic_update_slice_in_dim(array, old + value, start, axis=axis)


def _put_rows(plan: DistillPlan, array, value, start, fresh):
    """``array`` ([n]) with block rows ``value`` written from ``start`` (fresh rows only)."""
    if plan.kn == 1:
        return value
    if fresh is not None:
        value = jnp.where(fresh, value, lax.dynamic_slice_in_dim(array, start, plan.bn))
    return lax.dynamic_update_slice_in_dim(array, value, start, axis=0)


def _dot(plan: DistillPlan, a, b):
    # Accumulate in the compute dtype: bfloat16 products would lose the small terms.
    return jnp.dot(a, b, preferred_element_type=plan.cdtype, precision=plan.precision)


def _tile(plan: DistillPlan, loc: _Local, x_i, tx_i, start, j):
    """Student and teacher logits at temperature of block ``start`` x tile ``j``, with the
    tile's weights and start; classes an earlier tile covered are ``-inf`` in both."""
    whole = plan.kv == 1
    cstart, cfresh = _span(j, plan.kv, plan.bv, plan.v)
    w_j = _slice(loc.w, cstart, plan.bv, 1, whole)
    s = _dot(plan, x_i, w_j) / loc.temperature
    if loc.tl is not None:
        if whole and plan.kn == 1:
            t_raw = loc.tl
        else:
            t_raw = lax.dynamic_slice(loc.tl, (start, cstart), (plan.bn, plan.bv))
        t = t_raw.astype(plan.cdtype) / loc.temperature
    else:
        t = _dot(plan, tx_i, _slice(loc.tw, cstart, plan.bv, 1, whole)) / loc.temperature
    if cfresh is not None:
        s = jnp.where(cfresh[None, :], s, -jnp.inf)
        t = jnp.where(cfresh[None, :], t, -jnp.inf)
    return s, t, w_j, cstart


# ----------------------------------------------------------------------------------------------
# Per-tile arithmetic
# ----------------------------------------------------------------------------------------------


def _shift(m):
    """The running max, or 0 where it is -inf (keeps -inf - -inf = NaN out)."""
    return jnp.where(m == -jnp.inf, 0, m)


def _lse_parts(z):
    """(max, sum of exp(z - max)) of each row of a tile."""
    m = jnp.max(z, axis=-1)
    return m, jnp.sum(jnp.exp(z - _shift(m)[:, None]), axis=-1)


def _merge(a, b):
    """Online logsumexp: two (max, sum) pairs as one, each sum rescaled to the larger max."""
    (m1, s1), (m2, s2) = a, b
    m = jnp.maximum(m1, m2)
    shift = _shift(m)
    return m, s1 * jnp.exp(m1 - shift) + s2 * jnp.exp(m2 - shift)


def _finish_lse(plan: DistillPlan, m, s):
    """logsumexp from (max, sum), combined over the vocabulary shards (pmax / psum)."""
    if plan.vocab_axes:
        m_global = lax.pmax(m, plan.vocab_axes)
        s = lax.psum(s * jnp.exp(m - _shift(m_global)), plan.vocab_axes)
        m = m_global
    return _shift(m) + jnp.log(s)


def _log_probs(s, t, lse_s, lse_t):
    """(log q, log p, q, p) of a tile."""
    lq = s - lse_s[:, None]
    lp = t - lse_t[:, None]
    return lq, lp, jnp.exp(lq), jnp.exp(lp)


def _log_mixture(lq, lp, beta):
    """log M = log(beta p + (1 - beta) q), in log space: no underflow of p or q."""
    return jnp.logaddexp(jnp.log(beta) + lp, jnp.log1p(-beta) + lq)


def _xlogy_diff(a, la, lb):
    """a (log a - log b), 0 where a = 0 (0 log 0 = 0, even against log b = -inf)."""
    return jnp.where(a > 0, a * (la - lb), 0)


def _terms(plan: DistillPlan, s, t, lse_s, lse_t, beta):
    """Per-row (divergence, center) contributions of one tile."""
    lq, lp, q, p = _log_probs(s, t, lse_s, lse_t)
    if plan.divergence == "kl":
        loss = jnp.sum(_xlogy_diff(p, lp, lq), axis=-1)
        return loss, jnp.zeros_like(loss)
    if plan.divergence == "reverse_kl":
        loss = jnp.sum(_xlogy_diff(q, lq, lp), axis=-1)
        return loss, loss
    lm = _log_mixture(lq, lp, beta)
    kl_pm = jnp.sum(_xlogy_diff(p, lp, lm), axis=-1)
    kl_qm = jnp.sum(_xlogy_diff(q, lq, lm), axis=-1)
    return beta * kl_pm + (1 - beta) * kl_qm, kl_qm


def _du(plan: DistillPlan, s, t, lse_s, lse_t, center, coef, beta):
    """Gradient of ``sum(coef * loss)`` with respect to the tile's student logits (before the
    temperature: ``coef`` carries the 1 / T)."""
    lq, lp, q, p = _log_probs(s, t, lse_s, lse_t)
    if plan.divergence == "kl":
        du = q - p  # d KL(p || q) / ds
    elif plan.divergence == "reverse_kl":
        # d KL(q || p) / ds_c = q_c (log q_c - log p_c - KL(q || p))
        du = jnp.where(q > 0, q * (lq - lp - center[:, None]), 0)
    else:
        # d JS / ds_c = (1 - beta) q_c (log q_c - log M_c - KL(q || M))
        lm = _log_mixture(lq, lp, beta)
        du = (1 - beta) * jnp.where(q > 0, q * (lq - lm - center[:, None]), 0)
    du = coef[:, None] * du
    # Rows without a gradient stay exactly 0, even where their values are inf or NaN.
    return jnp.where((coef != 0)[:, None], du, 0)


def _vocab_sum(plan: DistillPlan, values):
    """Row sums combined over the vocabulary shards."""
    return lax.psum(values, plan.vocab_axes) if plan.vocab_axes else values


# ----------------------------------------------------------------------------------------------
# One token block
# ----------------------------------------------------------------------------------------------


def _block_inputs(plan: DistillPlan, loc: _Local, i):
    """(start, fresh, x_i, teacher x_i, keep_i) of token block ``i``."""
    start, fresh = _span(i, plan.kn, plan.bn, plan.n)
    whole = plan.kn == 1
    x_i = _slice(loc.x, start, plan.bn, 0, whole)
    tx_i = None if loc.tx is None else _slice(loc.tx, start, plan.bn, 0, whole)
    keep_i = _slice(loc.keep, start, plan.bn, 0, whole)
    if fresh is not None:
        keep_i = keep_i & fresh
    return start, fresh, x_i, tx_i, keep_i


def _block_rows(plan: DistillPlan, loc: _Local, x_i, tx_i, start):
    """(lse_s, lse_t, divergence, center) of a block's rows, and its tile when ``kv == 1``."""
    if plan.kv == 1:
        s, t, w_j, _ = _tile(plan, loc, x_i, tx_i, start, 0)
        lse_s = _finish_lse(plan, *_lse_parts(s))
        lse_t = _finish_lse(plan, *_lse_parts(t))
        loss, center = _vocab_sum(plan, _terms(plan, s, t, lse_s, lse_t, loc.beta))
        return (lse_s, lse_t, loss, center), (s, t, w_j)

    def lse_step(j, acc):
        s, t, _, _ = _tile(plan, loc, x_i, tx_i, start, j)
        return _merge(acc[0], _lse_parts(s)), _merge(acc[1], _lse_parts(t))

    empty = (jnp.full((plan.bn,), -jnp.inf, plan.cdtype), jnp.zeros((plan.bn,), plan.cdtype))
    (ms, ss), (mt, st) = fori(plan.kv, lse_step, (empty, empty))
    lse_s, lse_t = _finish_lse(plan, ms, ss), _finish_lse(plan, mt, st)

    def term_step(j, acc):
        s, t, _, _ = _tile(plan, loc, x_i, tx_i, start, j)
        loss, center = _terms(plan, s, t, lse_s, lse_t, loc.beta)
        return acc[0] + loss, acc[1] + center

    zeros = jnp.zeros((plan.bn,), plan.cdtype)
    loss, center = _vocab_sum(plan, fori(plan.kv, term_step, (zeros, zeros)))
    return (lse_s, lse_t, loss, center), None


def _tile_grads(plan: DistillPlan, loc: _Local, du, w_j, cstart, start, dx_i, dw):
    """Adds one tile's contributions to the block's input gradient and to the weight gradient."""
    dx_i = dx_i + _dot(plan, du, w_j.astype(plan.cdtype).T)
    if dw is not None:
        assert loc.xt is not None
        xt_i = _slice(loc.xt, start, plan.bn, 1, plan.kn == 1).astype(plan.cdtype)
        dw = _add_slice(dw, _dot(plan, xt_i, du), cstart, 1, plan.kv == 1)
    return dx_i, dw


# ----------------------------------------------------------------------------------------------
# Entry points (one device's share; ``shard_map`` bodies on a mesh)
# ----------------------------------------------------------------------------------------------


def local_rows(plan: DistillPlan, x, w, teacher: Teacher):
    """Per-token (divergence, lse_s, lse_t, center), in the local batch shape; 0 for tokens
    that do not count."""
    loc = _local(plan, x, w, teacher, need_xt=False)
    out = tuple(jnp.zeros((plan.n,), plan.cdtype) for _ in range(4))

    def block(i, out):
        start, fresh, x_i, tx_i, keep_i = _block_inputs(plan, loc, i)
        (lse_s, lse_t, loss, center), _ = _block_rows(plan, loc, x_i, tx_i, start)
        loss = jnp.where(keep_i, loss, 0)
        new = (loss, lse_s, lse_t, center)
        return tuple(_put_rows(plan, o, r, start, fresh) for o, r in zip(out, new, strict=True))

    out = fori(plan.kn, block, out)
    return tuple(o.reshape(x.shape[:-1]) for o in out)


def _denominator(plan: DistillPlan, keep):
    """Number of tokens that count, over the whole mesh."""
    den = jnp.sum(keep, dtype=plan.cdtype)
    return lax.psum(den, plan.data_axes) if plan.data_axes else den


def _reduce(plan: DistillPlan, loss_rows, keep):
    """The ``"sum"`` or ``"mean"`` of the per-token losses over the whole mesh."""
    total = jnp.sum(loss_rows)
    if plan.data_axes:
        total = lax.psum(total, plan.data_axes)
    if plan.reduction == "sum":
        return total
    return safe_divide(total, _denominator(plan, keep))


def local_reduced(plan: DistillPlan, x, w, teacher: Teacher):
    """The reduced loss, without gradients."""
    loss = local_rows(plan, x, w, teacher)[0]
    return _reduce(plan, loss, teacher.keep)


def _finish_grads(plan: DistillPlan, x, w, dx, dw):
    """Gradients in the shapes and dtypes of ``x`` and ``w``, summed over the mesh axes that
    hold other parts of them."""
    if plan.vocab_axes:
        dx = lax.psum(dx, plan.vocab_axes)
    if plan.data_axes:
        dw = lax.psum(dw, plan.data_axes)
    return dx.reshape(x.shape).astype(x.dtype), dw.astype(w.dtype)


def local_backward(plan: DistillPlan, x, w, teacher: Teacher, lse_s, lse_t, center, cotangent):
    """Recomputes every tile and returns the gradients of ``sum(cotangent * divergence)``."""
    loc = _local(plan, x, w, teacher, need_xt=True)
    flat = lambda r: r.reshape(plan.n).astype(plan.cdtype)
    lse_s, lse_t, center, cotangent = map(flat, (lse_s, lse_t, center, cotangent))
    d = loc.x.shape[-1]
    whole = plan.kn == 1

    def block(i, carry):
        dx, dw = carry
        start, _, x_i, tx_i, keep_i = _block_inputs(plan, loc, i)
        rows = [_slice(r, start, plan.bn, 0, whole) for r in (lse_s, lse_t, center, cotangent)]
        coef = jnp.where(keep_i, rows[3], 0) / loc.temperature

        def tile(j, carry):
            dx_i, dw = carry
            s, t, w_j, cstart = _tile(plan, loc, x_i, tx_i, start, j)
            du = _du(plan, s, t, rows[0], rows[1], rows[2], coef, loc.beta)
            return _tile_grads(plan, loc, du, w_j, cstart, start, dx_i, dw)

        dx_i, dw = fori(plan.kv, tile, (jnp.zeros((plan.bn, d), plan.cdtype), dw))
        return _add_slice(dx, dx_i, start, 0, whole), dw

    zeros = (jnp.zeros((plan.n, d), plan.cdtype), jnp.zeros(loc.w.shape, plan.cdtype))
    dx, dw = fori(plan.kn, block, zeros)
    return _finish_grads(plan, x, w, dx, dw)


def local_fused(plan: DistillPlan, x, w, teacher: Teacher):
    """Strip schedule (``kv == 1``): the reduced loss and its gradients in one visit per block."""
    assert plan.kv == 1
    loc = _local(plan, x, w, teacher, need_xt=True)
    # The mean's denominator is known before any logit, so the gradients can be scaled by it
    # inside the one pass.
    scale = jnp.ones((), plan.cdtype)
    if plan.reduction == "mean":
        scale = safe_divide(jnp.ones((), plan.cdtype), _denominator(plan, loc.keep))
    d = loc.x.shape[-1]
    whole = plan.kn == 1

    def block(i, carry):
        loss_rows, dx, dw = carry
        start, fresh, x_i, tx_i, keep_i = _block_inputs(plan, loc, i)
        (lse_s, lse_t, loss, center), tile = _block_rows(plan, loc, x_i, tx_i, start)
        assert tile is not None  # kv == 1: the block's one tile
        s, t, w_j = tile
        loss = jnp.where(keep_i, loss, 0)
        coef = jnp.where(keep_i, scale, 0) / loc.temperature
        du = _du(plan, s, t, lse_s, lse_t, center, coef, loc.beta)
        dx_i, dw = _tile_grads(
            plan, loc, du, w_j, 0, start, jnp.zeros((plan.bn, d), plan.cdtype), dw
        )
        dx = _add_slice(dx, dx_i.astype(plan.cdtype), start, 0, whole)
        return _put_rows(plan, loss_rows, loss, start, fresh), dx, dw

    init = (
        jnp.zeros((plan.n,), plan.cdtype),
        jnp.zeros((plan.n, d), plan.cdtype),
        jnp.zeros(loc.w.shape, plan.cdtype),
    )
    loss_rows, dx, dw = fori(plan.kn, block, init)
    return _reduce(plan, loss_rows, loc.keep), _finish_grads(plan, x, w, dx, dw)
