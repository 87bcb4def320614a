"""Fused linear + softmax cross-entropy that never materialises the ``[N, V]`` logits.

A language-model head computes ``logits = x @ w + bias`` for ``N`` tokens and ``V`` classes and
then a cross-entropy; the ``N x V`` logits and their gradient dominate memory. Here the loss is
computed block by block: tokens in blocks of ``block_size_tokens`` rows, the vocabulary in tiles
of ``block_size_vocab`` classes. Only one ``[tokens, classes]`` block of logits (and of their
gradient) exists at a time.

Two schedules share the same block arithmetic:

* **tiles** (any block sizes): a forward pass over the tiles keeps an online logsumexp per token
  (plus the label logit, the smoothing sums and the argmax); the backward pass of the custom VJP
  recomputes each tile once from the saved per-token logsumexp and turns it into the gradient of
  ``x``, ``w`` and ``bias`` right away (``8 N D V`` FLOPs in all, like Cut Cross-Entropy).
* **strip** (``block_size_vocab >= V`` and ``reduction`` ``"sum"`` / ``"mean"``): a block of tokens
  sees the whole vocabulary at once, so its logsumexp is final before the block is left and its
  gradients are computed in the same visit, during the forward pass (``6 N D V`` FLOPs, the same
  as the materialised loss, like Liger Kernel). Called without differentiation, only the loss is
  computed (``2 N D V``).

The three products of a block (``x_b @ w``, ``g_b @ w.T`` and ``x_b.T @ g_b``) are plain matrix
products: ``x`` is transposed once, outside the loops, because XLA:CPU runs a product whose left
operand contracts its first axis on a much slower path.

Block sizes are global: on a mesh each device holds its share of a block, so per-device memory
falls with the number of devices.

Block layout: a block of tokens is ``pn`` equal runs of consecutive rows, one from each of ``pn``
equal chunks of the token axis (``pn = 1`` on one device: a block is consecutive rows); a vocab
tile is likewise ``pv`` runs. With ``pn`` / ``pv`` equal to the number of devices an axis is
sharded over, every block spreads evenly over the devices, so XLA's automatic partitioning of
the loops needs no gathers.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.typing import ArrayLike

from xent_jax import _validation as v
from xent_jax._reduction import reduce_loss

# Default block sizes: a [tokens, classes] block of at most _BLOCK_ELEMENTS float32 values
# (16 MiB), tokens first (large token blocks keep the dW matmul, which contracts over tokens,
# efficient), vocabulary tiles of at least _MIN_VOCAB_TILE classes.
_BLOCK_ELEMENTS = 1 << 22
_MAX_TOKEN_BLOCK = 8192
_MIN_VOCAB_TILE = 512
# The strip schedule is the default while a block of _STRIP_MIN_TOKENS tokens over the whole
# vocabulary fits in _BLOCK_ELEMENTS.
_STRIP_MIN_TOKENS = 64


class LinearCrossEntropyAux(NamedTuple):
    """Extra per-token outputs of the fused loss, computed in the same pass as the loss.

    Attributes:
      logsumexp: ``[...]`` float32 log-normaliser of each token's (soft-capped, masked) logits;
        0 where every class is masked.
      argmax: ``[...]`` int32 index of each token's largest logit (first one on ties).
      accuracy: scalar float32, the fraction of valid tokens (not masked by ``where``, not
        ``ignore_index``) whose argmax equals the label; 0 when there are none.
    """

    logsumexp: jax.Array
    argmax: jax.Array
    accuracy: jax.Array


# ----------------------------------------------------------------------------------------------
# Static plan
# ----------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class _Plan:
    """Everything static about one call: options, layout and block sizes (local to a device)."""

    eps: float
    z_loss: float
    softcap: float | None
    has_bias: bool
    has_cw: bool
    cmask: str | None  # None, "shared" ([1, V]) or "rows" ([N, V])
    has_example_mask: bool
    ignore_index: int | None
    aux: bool
    cdtype: Any  # compute dtype (float32, or float64 under x64)
    n: int  # local tokens
    pn: int  # token layout factor
    kn: int  # token blocks
    bc: int  # rows per run of a token block (block = pn * bc rows)
    v: int  # local classes
    pv: int  # vocab layout factor
    kv: int  # vocab tiles
    tc: int  # classes per run of a tile (tile = pv * tc classes)
    v_global: int  # classes in all (labels are checked against this)
    vocab_axes: tuple[str, ...] | None  # mesh axes the classes are split over (shard_map)
    data_axes: tuple[str, ...] | None  # mesh axes the tokens are split over (shard_map)

    @property
    def bn(self) -> int:
        return self.pn * self.bc

    @property
    def bv(self) -> int:
        return self.pv * self.tc

    @property
    def n_chunk(self) -> int:
        return self.n // self.pn

    @property
    def v_chunk(self) -> int:
        return self.v // self.pv

    @property
    def padded_rows(self) -> bool:
        return self.kn * self.bc != self.n_chunk

    @property
    def padded_classes(self) -> bool:
        return self.kv * self.tc != self.v_chunk


def _split(length: int, max_block: int, layout: int) -> tuple[int, int, int]:
    """Splits ``length = layout * chunk`` into ``k`` blocks of ``layout * c`` (``k * c >= chunk``).

    Returns ``(layout, k, c)``; prefers a ``k`` that divides the chunk exactly (no padding).
    """
    if layout < 1 or length % layout:
        layout = 1
    chunk = length // layout
    if chunk == 0:
        return layout, 1, 1
    c_max = max(1, max_block // layout)
    k0 = -(-chunk // c_max)
    for k in range(k0, min(chunk, 2 * k0) + 1):
        if chunk % k == 0:
            return layout, k, chunk // k
    return layout, k0, -(-chunk // k0)


def _default_blocks(n: int, v: int, reduction: str) -> tuple[int, int]:
    """Default (block_size_tokens, block_size_vocab)."""
    if reduction != "none" and v * _STRIP_MIN_TOKENS <= _BLOCK_ELEMENTS:
        # Strip: whole vocabulary per block, as many tokens as fit.
        return max(1, min(n, _BLOCK_ELEMENTS // max(v, 1))), v
    bn = max(1, min(n, _MAX_TOKEN_BLOCK))
    bv = max(_MIN_VOCAB_TILE, _BLOCK_ELEMENTS // bn)
    return bn, min(v, bv)


# ----------------------------------------------------------------------------------------------
# Layout helpers: [rows] <-> [kn, bn] blocks, [classes] <-> [kv, bv] tiles
# ----------------------------------------------------------------------------------------------


def _rows_to_blocks(plan: _Plan, a: jax.Array, fill) -> jax.Array:
    """``[n, ...]`` -> ``[kn, bn, ...]`` (padded with ``fill``)."""
    rest = a.shape[1:]
    a = a.reshape(plan.pn, plan.n_chunk, *rest)
    if plan.padded_rows:
        pad = plan.kn * plan.bc - plan.n_chunk
        a = jnp.pad(a, [(0, 0), (0, pad)] + [(0, 0)] * len(rest), constant_values=fill)
    a = a.reshape(plan.pn, plan.kn, plan.bc, *rest)
    return jnp.swapaxes(a, 0, 1).reshape(plan.kn, plan.bn, *rest)


def _blocks_to_rows(plan: _Plan, a: jax.Array) -> jax.Array:
    """Inverse of :func:`_rows_to_blocks`."""
    rest = a.shape[2:]
    a = jnp.swapaxes(a.reshape(plan.kn, plan.pn, plan.bc, *rest), 0, 1)
    a = a.reshape(plan.pn, plan.kn * plan.bc, *rest)
    if plan.padded_rows:
        a = a[:, : plan.n_chunk]
    return a.reshape(plan.n, *rest)


def _x_view(plan: _Plan, x: jax.Array) -> jax.Array:
    """``[n, D]`` -> ``[pn, kn, bc, D]`` (padded with zeros); block ``i`` is ``[:, i]``."""
    d = x.shape[-1]
    x = x.reshape(plan.pn, plan.n_chunk, d)
    if plan.padded_rows:
        x = jnp.pad(x, [(0, 0), (0, plan.kn * plan.bc - plan.n_chunk), (0, 0)])
    return x.reshape(plan.pn, plan.kn, plan.bc, d)


def _x_unview(plan: _Plan, x4: jax.Array) -> jax.Array:
    d = x4.shape[-1]
    x = x4.reshape(plan.pn, plan.kn * plan.bc, d)
    if plan.padded_rows:
        x = x[:, : plan.n_chunk]
    return x.reshape(plan.n, d)


def _x_block(plan: _Plan, x4: jax.Array, i) -> jax.Array:
    if plan.kn == 1:
        return x4.reshape(plan.bn, x4.shape[-1])
    blk = lax.dynamic_index_in_dim(x4, i, axis=1, keepdims=False)
    return blk.reshape(plan.bn, x4.shape[-1])


def _xt_view(x4: jax.Array) -> jax.Array:
    """``[pn, kn, bc, D]`` -> ``[D, pn, kn, bc]``, transposed once outside the loops so that the
    weight-gradient product of every block is a plain (non-transposed) matrix product."""
    return jnp.transpose(x4, (3, 0, 1, 2))


def _xt_block(plan: _Plan, xt4: jax.Array, i) -> jax.Array:
    """``[D, bn]``: block ``i`` of the transposed inputs."""
    if plan.kn == 1:
        return xt4.reshape(xt4.shape[0], plan.bn)
    blk = lax.dynamic_index_in_dim(xt4, i, axis=2, keepdims=False)
    return blk.reshape(xt4.shape[0], plan.bn)


def _cols_to_tiles(plan: _Plan, a: jax.Array, fill) -> jax.Array:
    """``[..., v]`` -> ``[kv, ..., bv]`` (padded with ``fill``)."""
    lead = a.shape[:-1]
    a = a.reshape(*lead, plan.pv, plan.v_chunk)
    if plan.padded_classes:
        pad = plan.kv * plan.tc - plan.v_chunk
        a = jnp.pad(a, [(0, 0)] * (len(lead) + 1) + [(0, pad)], constant_values=fill)
    a = a.reshape(*lead, plan.pv, plan.kv, plan.tc)
    a = jnp.moveaxis(a, -2, 0)
    return a.reshape(plan.kv, *lead, plan.bv)


def _w_view(plan: _Plan, w: jax.Array) -> jax.Array:
    """``[D, v]`` -> ``[D, pv, kv, tc]`` (padded with zeros); tile ``j`` is ``[:, :, j]``."""
    d = w.shape[0]
    w = w.reshape(d, plan.pv, plan.v_chunk)
    if plan.padded_classes:
        w = jnp.pad(w, [(0, 0), (0, 0), (0, plan.kv * plan.tc - plan.v_chunk)])
    return w.reshape(d, plan.pv, plan.kv, plan.tc)


def _w_unview(plan: _Plan, w4: jax.Array) -> jax.Array:
    d = w4.shape[0]
    w = w4.reshape(d, plan.pv, plan.kv * plan.tc)
    if plan.padded_classes:
        w = w[:, :, : plan.v_chunk]
    return w.reshape(d, plan.v)


def _w_tile(plan: _Plan, w4: jax.Array, j) -> jax.Array:
    if plan.kv == 1:
        return w4.reshape(w4.shape[0], plan.bv)
    tile = lax.dynamic_index_in_dim(w4, j, axis=2, keepdims=False)
    return tile.reshape(w4.shape[0], plan.bv)


def _b_unview(plan: _Plan, b3: jax.Array) -> jax.Array:
    b = b3.reshape(plan.pv, plan.kv * plan.tc)
    if plan.padded_classes:
        b = b[:, : plan.v_chunk]
    return b.reshape(plan.v)


def _index(a: jax.Array | None, i, static_single: bool):
    if a is None:
        return None
    if static_single:
        return a[0]
    return lax.dynamic_index_in_dim(a, i, axis=0, keepdims=False)


def _update(a: jax.Array, value: jax.Array, i, static_single: bool) -> jax.Array:
    if static_single:
        return value[None]
    return lax.dynamic_update_index_in_dim(a, value, i, axis=0)


def _loop(n: int, body, carry):
    """``fori_loop`` that is a plain call when there is a single step (no while loop in HLO)."""
    if n == 1:
        return body(0, carry)
    return lax.fori_loop(0, n, body, carry)


# ----------------------------------------------------------------------------------------------
# Per-tile arithmetic
# ----------------------------------------------------------------------------------------------


class _Inputs(NamedTuple):
    """Local arrays in block/tile layout (``None`` where an option is off)."""

    x4: jax.Array  # [pn, kn, bc, D]
    w4: jax.Array  # [D, pv, kv, tc]
    labels: jax.Array  # [kn, bn] int32, clipped into [0, V_global)
    keep: jax.Array  # [kn, bn] bool: not masked by where, not ignored, in the padding
    invalid: jax.Array  # [kn, bn] bool: label out of range (and not ignored/masked)
    wy: jax.Array | None  # [kn, bn] class weight of the label
    cls: jax.Array  # [kv, bv] int32 global class of each tile column (-1 in the padding)
    bias: jax.Array | None  # [kv, bv]
    cw: jax.Array | None  # [kv, bv]
    cmask: jax.Array | None  # shared: [kv, 1, bv]; rows: [kn, kv, bn, bv]; padding: [kv, 1, bv]


class _Stats(NamedTuple):
    """Running per-token statistics (each ``[kn, bn]``; unused fields are dummies)."""

    m: jax.Array  # running max of the available logits
    s: jax.Array  # sum of exp(z - shift(m))
    zy: jax.Array  # label logit
    k: jax.Array  # number of available classes (smoothing only)
    sw: jax.Array  # sum of class weights of available classes (smoothing only)
    swz: jax.Array  # sum of w_c (z_c - shift(m)) over available classes (smoothing only)
    best: jax.Array  # max logit (argmax only)
    arg: jax.Array  # global class of the max logit (argmax only)


def _shift(m: jax.Array) -> jax.Array:
    return jnp.where(m == -jnp.inf, 0, m)


def _tile_mask(plan: _Plan, inp: _Inputs, i, j) -> jax.Array | None:
    """Boolean ``[bn or 1, bv]`` of classes that exist and are not masked; ``None``: all."""
    if inp.cmask is None:
        return None
    if plan.cmask == "rows":
        blk = _index(inp.cmask, i, plan.kn == 1)
        return _index(blk, j, plan.kv == 1)
    return _index(inp.cmask, j, plan.kv == 1)


def _tile_logits(plan: _Plan, inp: _Inputs, xb: jax.Array, wt: jax.Array, j, mask):
    """Returns (capped logits, masked capped logits) of one ``[bn, bv]`` tile."""
    u = jnp.dot(xb, wt, preferred_element_type=plan.cdtype)
    return _transform_logits(plan, inp, u, j, mask)


def _transform_logits(plan: _Plan, inp: _Inputs, u: jax.Array, j, mask):
    """Bias, soft cap and mask applied to raw logits ``u``: (capped, masked capped)."""
    if inp.bias is not None:
        u = u + _index(inp.bias, j, plan.kv == 1).astype(plan.cdtype)[None, :]
    if plan.softcap is not None:
        cap = plan.softcap
        z = jnp.where(u == -jnp.inf, u, cap * jnp.tanh(u / cap))
    else:
        z = u
    zm = z if mask is None else jnp.where(mask, z, -jnp.inf)
    return z, zm


def _init_stats(plan: _Plan) -> _Stats:
    shape = (plan.kn, plan.bn)
    f = functools.partial(jnp.zeros, shape, plan.cdtype)
    return _Stats(
        m=jnp.full(shape, -jnp.inf, plan.cdtype),
        s=f(),
        zy=f(),
        k=f(),
        sw=f(),
        swz=f(),
        best=jnp.full(shape, -jnp.inf, plan.cdtype),
        arg=jnp.zeros(shape, jnp.int32),
    )


def _update_stats(plan: _Plan, st: tuple, zm: jax.Array, y, cls_t, cw_t) -> tuple:
    """Folds one tile into the running statistics of its rows (tuples of ``[bn]``)."""
    m, s, zy, k, sw, swz, best, arg = st
    m_new = jnp.maximum(m, jnp.max(zm, axis=-1))
    shift = _shift(m_new)
    s = s * jnp.exp(m - shift) + jnp.sum(jnp.exp(zm - shift[:, None]), axis=-1)
    zy = zy + jnp.sum(jnp.where(cls_t[None, :] == y[:, None], zm, 0), axis=-1)
    if plan.eps:
        avail = zm != -jnp.inf
        k = k + jnp.sum(avail, axis=-1, dtype=plan.cdtype)
        # Re-reference the running sum of w_c (z_c - shift) to the new shift.
        swz = swz + jnp.where(m == -jnp.inf, 0, sw * (m - shift))
        if cw_t is None:
            sw = sw + jnp.sum(avail, axis=-1, dtype=plan.cdtype)
            swz = swz + jnp.sum(jnp.where(avail, zm - shift[:, None], 0), axis=-1)
        else:
            cw_b = cw_t[None, :]
            sw = sw + jnp.sum(jnp.where(avail, cw_b, 0), axis=-1)
            swz = swz + jnp.sum(jnp.where(avail, cw_b * (zm - shift[:, None]), 0), axis=-1)
    if plan.aux:
        t_best = jnp.max(zm, axis=-1)
        t_arg = cls_t[jnp.argmax(zm, axis=-1)]
        better = t_best > best
        best = jnp.where(better, t_best, best)
        arg = jnp.where(better, t_arg, arg)
    return m_new, s, zy, k, sw, swz, best, arg


def _combine_stats(plan: _Plan, st: _Stats) -> _Stats:
    """Combines the statistics of the vocabulary shards (pmax / psum over ``vocab_axes``)."""
    axes = plan.vocab_axes
    if not axes:
        return st
    m_g = lax.pmax(st.m, axes)
    shift_g = _shift(m_g)
    s = st.s * jnp.exp(st.m - shift_g)
    zy = st.zy
    k, sw, swz = st.k, st.sw, st.swz
    if plan.eps:
        swz = swz + jnp.where(st.m == -jnp.inf, 0, sw * (_shift(st.m) - shift_g))
    s, zy, k, sw, swz = lax.psum((s, zy, k, sw, swz), axes)
    best, arg = st.best, st.arg
    if plan.aux:
        best_g = lax.pmax(best, axes)
        arg = lax.pmin(jnp.where(best == best_g, arg, jnp.iinfo(jnp.int32).max), axes)
        best = best_g
    return _Stats(m_g, s, zy, k, sw, swz, best, arg)


class _Rows(NamedTuple):
    """Per-token results derived from the final statistics (``[kn, bn]`` each)."""

    loss: jax.Array
    lse: jax.Array
    valid: jax.Array  # counts in the loss (and the mean's denominator)
    grad_ok: jax.Array  # receives a gradient (valid and the label is in range)
    a: jax.Array  # coefficient of p_c in dL/dz_c (per unit cotangent)
    b: jax.Array  # coefficient of the label one-hot
    c: jax.Array  # coefficient of w_c (smoothing)


def _finish_rows(plan: _Plan, inp: _Inputs, st: _Stats) -> _Rows:
    row_ok = st.m != -jnp.inf
    lse = jnp.where(row_ok, _shift(st.m) + jnp.log(jnp.where(row_ok, st.s, 1)), 0)
    one_minus = 1.0 - plan.eps
    wy = inp.wy if inp.wy is not None else 1.0
    nll = lse - st.zy
    if inp.wy is not None:
        nll = nll * inp.wy
    loss = nll
    a = jnp.ones_like(lse) * wy * one_minus
    b = a
    c = jnp.zeros_like(lse)
    if plan.eps:
        k = jnp.maximum(st.k, 1)
        smooth = (st.sw * (lse - _shift(st.m)) - st.swz) / k
        loss = one_minus * nll + plan.eps * smooth
        c = plan.eps / k
        a = a + c * st.sw
    if plan.z_loss:
        loss = loss + plan.z_loss * jnp.square(lse)
        a = a + 2.0 * plan.z_loss * lse
    valid = inp.keep & row_ok
    loss = jnp.where(inp.invalid, jnp.nan, loss)
    loss = jnp.where(valid, loss, 0)
    grad_ok = valid & ~inp.invalid
    return _Rows(loss, lse, valid, grad_ok, a, b, c)


def _tile_grad(plan: _Plan, z, zm, mask, lse, a, b, c, y, cls_t, cw_t) -> jax.Array:
    """dL/du of one tile for per-row coefficients (cotangent already folded into a, b, c)."""
    p = jnp.exp(zm - lse[:, None])
    du = a[:, None] * p - jnp.where(cls_t[None, :] == y[:, None], b[:, None], 0)
    if plan.eps:
        wc = 1.0 if cw_t is None else cw_t[None, :]
        du = du - jnp.where(zm != -jnp.inf, c[:, None] * wc, 0)
    elif mask is not None:
        du = jnp.where(mask, du, 0)
    if plan.softcap is not None:
        du = du * (1.0 - jnp.square(z / plan.softcap))
    # Rows without a gradient stay exactly 0, even where their logits are NaN or inf.
    live = (a != 0) | (b != 0) | (c != 0)
    return jnp.where(live[:, None], du, 0)


# ----------------------------------------------------------------------------------------------
# Passes
# ----------------------------------------------------------------------------------------------


def _stats_pass(plan: _Plan, inp: _Inputs) -> _Stats:
    """Forward pass over all tiles (vocabulary outer, tokens inner): final per-token stats."""
    single_i, single_j = plan.kn == 1, plan.kv == 1

    def vocab_step(j, st):
        wt = _w_tile(plan, inp.w4, j)
        cls_t = _index(inp.cls, j, single_j)
        cw_t = _index(inp.cw, j, single_j)

        def token_step(i, st):
            xb = _x_block(plan, inp.x4, i)
            mask = _tile_mask(plan, inp, i, j)
            _, zm = _tile_logits(plan, inp, xb, wt, j, mask)
            y = _index(inp.labels, i, single_i)
            rows = tuple(_index(a, i, single_i) for a in st)
            rows = _update_stats(plan, rows, zm, y, cls_t, cw_t)
            return _Stats(*(_update(a, r, i, single_i) for a, r in zip(st, rows, strict=True)))

        return _loop(plan.kn, token_step, st)

    st = _loop(plan.kv, vocab_step, _init_stats(plan))
    return _combine_stats(plan, st)


def _grad_pass(plan: _Plan, inp: _Inputs, lse, a, b, c, need_dx: bool, need_dw: bool):
    """Backward pass: recomputes every tile once; returns (dx4, dw4, db3) in compute dtype."""
    single_i, single_j = plan.kn == 1, plan.kv == 1
    d = inp.x4.shape[-1]
    dx4 = jnp.zeros(inp.x4.shape, plan.cdtype) if need_dx else None
    dw4 = jnp.zeros(inp.w4.shape, plan.cdtype) if need_dw else None
    db3 = jnp.zeros((plan.pv, plan.kv, plan.tc), plan.cdtype) if inp.bias is not None else None
    xt4 = _xt_view(inp.x4) if need_dw else None

    def vocab_step(j, carry):
        dx4, dw4, db3 = carry
        wt = _w_tile(plan, inp.w4, j)
        wt_c = wt.astype(plan.cdtype)
        cls_t = _index(inp.cls, j, single_j)
        cw_t = _index(inp.cw, j, single_j)
        dwt = jnp.zeros((d, plan.bv), plan.cdtype) if need_dw else None
        dbt = jnp.zeros((plan.bv,), plan.cdtype) if db3 is not None else None

        def token_step(i, carry):
            dx4, dwt, dbt = carry
            xb = _x_block(plan, inp.x4, i)
            mask = _tile_mask(plan, inp, i, j)
            z, zm = _tile_logits(plan, inp, xb, wt, j, mask)
            y = _index(inp.labels, i, single_i)
            co = [_index(t, i, single_i) for t in (lse, a, b, c)]
            du = _tile_grad(plan, z, zm, mask, *co, y, cls_t, cw_t)
            if dx4 is not None:
                dxb = jnp.dot(du, wt_c.T, preferred_element_type=plan.cdtype)
                dxb = dxb.reshape(plan.pn, 1, plan.bc, d)
                if single_i:
                    dx4 = dx4 + dxb
                else:
                    old = lax.dynamic_slice_in_dim(dx4, i, 1, axis=1)
                    dx4 = lax.dynamic_update_slice_in_dim(dx4, old + dxb, i, axis=1)
            if dwt is not None:
                xbt = _xt_block(plan, xt4, i).astype(plan.cdtype)
                dwt = dwt + jnp.dot(xbt, du, preferred_element_type=plan.cdtype)
            if dbt is not None:
                dbt = dbt + jnp.sum(du, axis=0)
            return dx4, dwt, dbt

        dx4, dwt, dbt = _loop(plan.kn, token_step, (dx4, dwt, dbt))
        if dw4 is not None:
            dwt = dwt.reshape(d, plan.pv, 1, plan.tc)
            dw4 = dwt if single_j else lax.dynamic_update_slice_in_dim(dw4, dwt, j, axis=2)
        if db3 is not None:
            dbt = dbt.reshape(plan.pv, 1, plan.tc)
            db3 = dbt if single_j else lax.dynamic_update_slice_in_dim(db3, dbt, j, axis=1)
        return dx4, dw4, db3

    return _loop(plan.kv, vocab_step, (dx4, dw4, db3))


def _strip_pass(plan: _Plan, inp: _Inputs, row_scale, need_dx: bool, need_dw: bool):
    """One pass over token blocks, each against the whole vocabulary (``kv == 1``): statistics,
    per-token loss and the gradient of ``sum(row_scale * loss)`` in the same visit."""
    assert plan.kv == 1
    single_i = plan.kn == 1
    d = inp.x4.shape[-1]
    wt = _w_tile(plan, inp.w4, 0)
    wt_c = wt.astype(plan.cdtype)
    cls_t = inp.cls[0]
    cw_t = None if inp.cw is None else inp.cw[0]
    dx4 = jnp.zeros(inp.x4.shape, plan.cdtype) if need_dx else None
    dwt = jnp.zeros((d, plan.bv), plan.cdtype) if need_dw else None
    dbt = jnp.zeros((plan.bv,), plan.cdtype) if inp.bias is not None else None
    xt4 = _xt_view(inp.x4) if need_dw else None
    shape = (plan.kn, plan.bn)
    out = (
        jnp.zeros(shape, plan.cdtype),  # loss
        jnp.zeros(shape, plan.cdtype),  # lse
        jnp.zeros(shape, jnp.bool_),  # valid
        jnp.zeros(shape, jnp.int32),  # argmax
    )
    dummy = jnp.zeros((plan.bn,), plan.cdtype)

    def token_step(i, carry):
        dx4, dwt, dbt, out = carry
        xb = _x_block(plan, inp.x4, i)
        mask = _tile_mask(plan, inp, i, 0)
        z, zm = _tile_logits(plan, inp, xb, wt, 0, mask)
        y = _index(inp.labels, i, single_i)
        st = (
            jnp.full((plan.bn,), -jnp.inf, plan.cdtype),
            dummy,
            dummy,
            dummy,
            dummy,
            dummy,
            jnp.full((plan.bn,), -jnp.inf, plan.cdtype),
            jnp.zeros((plan.bn,), jnp.int32),
        )
        st = _Stats(*_update_stats(plan, st, zm, y, cls_t, cw_t))
        st = _combine_stats(plan, st)
        sub = inp._replace(
            labels=y,
            keep=_index(inp.keep, i, single_i),
            invalid=_index(inp.invalid, i, single_i),
            wy=_index(inp.wy, i, single_i),
        )
        rows = _finish_rows(plan, sub, st)
        g = jnp.where(rows.grad_ok, _index(row_scale, i, single_i), 0)
        du = _tile_grad(
            plan, z, zm, mask, rows.lse, g * rows.a, g * rows.b, g * rows.c, y, cls_t, cw_t
        )
        if dx4 is not None:
            dxb = jnp.dot(du, wt_c.T, preferred_element_type=plan.cdtype)
            dxb = dxb.reshape(plan.pn, 1, plan.bc, d)
            dx4 = dxb if single_i else lax.dynamic_update_slice_in_dim(dx4, dxb, i, axis=1)
        if dwt is not None:
            xbt = _xt_block(plan, xt4, i).astype(plan.cdtype)
            dwt = dwt + jnp.dot(xbt, du, preferred_element_type=plan.cdtype)
        if dbt is not None:
            dbt = dbt + jnp.sum(du, axis=0)
        new = (rows.loss, rows.lse, rows.valid, st.arg)
        out = tuple(_update(o, r, i, single_i) for o, r in zip(out, new, strict=True))
        return dx4, dwt, dbt, out

    dx4, dwt, dbt, out = _loop(plan.kn, token_step, (dx4, dwt, dbt, out))
    dw4 = None if dwt is None else dwt.reshape(d, plan.pv, 1, plan.tc)
    db3 = None if dbt is None else dbt.reshape(plan.pv, 1, plan.tc)
    return out, (dx4, dw4, db3)


# ----------------------------------------------------------------------------------------------
# Local (per-device) entry points
# ----------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class _Call:
    """Static description of one call: the local plan plus how it is laid out on a mesh."""

    plan: _Plan
    reduction: str
    mesh: Any = None  # shard_map over this mesh when not None
    batch_spec: tuple = ()  # PartitionSpec entries of the batch dims
    data_axes: tuple[str, ...] = ()
    vocab_axes: tuple[str, ...] = ()


class _NonDiff(NamedTuple):
    labels: jax.Array  # batch shape, integer
    example_mask: jax.Array | None  # batch shape, bool
    class_weights: jax.Array | None  # [V]
    class_mask: jax.Array | None  # [1, V] or batch shape + [V]


def _vocab_offset(call: _Call, v_local: int):
    if not call.vocab_axes:
        return 0
    return lax.axis_index(call.vocab_axes) * v_local


def _prepare(call: _Call, x, w, bias, nd: _NonDiff) -> _Inputs:
    plan = call.plan
    inp = _prepare_rows(call, nd, bias)
    return inp._replace(x4=_x_view(plan, x.reshape(plan.n, x.shape[-1])), w4=_w_view(plan, w))


def _prepare_rows(call: _Call, nd: _NonDiff, bias) -> _Inputs:
    """Everything but ``x`` and ``w`` in block / tile layout (``x4`` and ``w4`` are ``None``)."""
    plan = call.plan
    n = plan.n
    offset = _vocab_offset(call, plan.v)
    labels = nd.labels.reshape(n).astype(jnp.int32)
    keep = jnp.ones((n,), jnp.bool_) if nd.example_mask is None else nd.example_mask.reshape(n)
    invalid = (labels < 0) | (labels >= plan.v_global)
    if plan.ignore_index is not None:
        kept = labels != plan.ignore_index
        keep = keep & kept
        invalid = invalid & kept
    safe = jnp.clip(labels, 0, plan.v_global - 1)
    wy = None
    if nd.class_weights is not None:
        cw = nd.class_weights
        local = safe - offset
        owned = (local >= 0) & (local < plan.v)
        wy = jnp.where(owned, cw.astype(plan.cdtype)[jnp.clip(local, 0, plan.v - 1)], 0)
        if call.vocab_axes:
            wy = lax.psum(wy, call.vocab_axes)
    cls = jnp.arange(plan.v, dtype=jnp.int32) + offset
    cmask = None
    if nd.class_mask is not None:
        if plan.cmask == "rows":
            cm = _rows_to_blocks(plan, nd.class_mask.reshape(n, plan.v), False)
            cmask = jnp.swapaxes(_cols_to_tiles(plan, cm, False), 0, 1)
        else:
            cmask = _cols_to_tiles(plan, nd.class_mask.reshape(1, plan.v), False)
    elif plan.cmask == "shared":  # padding only
        cmask = _cols_to_tiles(plan, jnp.ones((1, plan.v), jnp.bool_), False)
    return _Inputs(
        x4=None,
        w4=None,
        labels=_rows_to_blocks(plan, safe, 0),
        keep=_rows_to_blocks(plan, keep, False),
        invalid=_rows_to_blocks(plan, invalid, False),
        wy=None if wy is None else _rows_to_blocks(plan, wy, 0),
        cls=_cols_to_tiles(plan, cls, -1),
        bias=None if bias is None else _cols_to_tiles(plan, bias, 0),
        cw=None if nd.class_weights is None else _cols_to_tiles(plan, nd.class_weights, 0),
        cmask=cmask,
    )


def _denominator_weights(plan: _Plan, inp: _Inputs, valid: jax.Array) -> jax.Array:
    if inp.wy is None:
        return valid.astype(plan.cdtype)
    return jnp.where(valid, inp.wy, 0)


def _local_forward(call: _Call, x, w, bias, nd: _NonDiff):
    """Stats pass: per-token loss, lse, argmax, validity, mean weights and VJP coefficients."""
    plan = call.plan
    batch = x.shape[:-1]
    inp = _prepare(call, x, w, bias, nd)
    st = _stats_pass(plan, inp)
    rows = _finish_rows(plan, inp, st)
    ok = rows.grad_ok
    out = (
        rows.loss,
        rows.lse,
        st.arg,
        rows.valid,
        _denominator_weights(plan, inp, rows.valid),
        jnp.where(ok, rows.a, 0),
        jnp.where(ok, rows.b, 0),
        jnp.where(ok, rows.c, 0),
    )
    return tuple(_blocks_to_rows(plan, o).reshape(batch) for o in out)


def _local_backward(call: _Call, x, w, bias, nd: _NonDiff, lse, a, b, c, g):
    """Recomputes every tile once and returns the gradients of ``sum(g * loss)``."""
    plan = call.plan
    inp = _prepare(call, x, w, bias, nd)
    n = plan.n
    blocks = lambda r: _rows_to_blocks(plan, r.reshape(n).astype(plan.cdtype), 0)
    g = blocks(g)
    dx4, dw4, db3 = _grad_pass(
        plan, inp, blocks(lse), g * blocks(a), g * blocks(b), g * blocks(c), True, True
    )
    return _finish_grads(call, x, w, bias, dx4, dw4, db3)


def _finish_grads(call: _Call, x, w, bias, dx4, dw4, db3):
    plan = call.plan
    dx = _x_unview(plan, dx4).reshape(x.shape)
    dw = _w_unview(plan, dw4)
    db = None if db3 is None else _b_unview(plan, db3)
    if call.vocab_axes:
        dx = lax.psum(dx, call.vocab_axes)
    if call.data_axes:
        dw = lax.psum(dw, call.data_axes)
        db = None if db is None else lax.psum(db, call.data_axes)
    return (
        dx.astype(x.dtype),
        dw.astype(w.dtype),
        None if db is None else db.astype(bias.dtype),
    )


def _rows_with_a_class(call: _Call, inp_bias, nd: _NonDiff, n: int):
    """Whether each row has an available class, known before any logit (finite x and w)."""
    plan = call.plan
    avail = None if inp_bias is None else inp_bias != -jnp.inf
    if nd.class_mask is not None:
        cm = nd.class_mask.reshape(-1, plan.v)
        if avail is not None:
            cm = cm & avail[None, :]
        count = jnp.sum(cm, axis=-1, dtype=jnp.int32)
    elif avail is not None:
        count = jnp.sum(avail, dtype=jnp.int32)[None]
    else:
        return jnp.ones((n,), jnp.bool_) if plan.v_global else jnp.zeros((n,), jnp.bool_)
    if call.vocab_axes:
        count = lax.psum(count, call.vocab_axes)
    return jnp.broadcast_to(count > 0, (n,))


def _local_reduced_primal(call: _Call, x, w, bias, nd: _NonDiff):
    """Loss value only (no gradients): the stats pass, then the reduction."""
    loss, lse, arg, valid, denw, *_ = _local_forward(call, x, w, bias, nd)
    total, den = jnp.sum(loss), jnp.sum(denw)
    if call.data_axes:
        total, den = lax.psum((total, den), call.data_axes)
    return _reduce_total(call, total, den), lse, arg, valid


def _reduce_total(call: _Call, total, den):
    if call.reduction == "sum":
        return total
    return jnp.where(den > 0, total / jnp.where(den > 0, den, 1), 0)


def _local_reduced_fwd(call: _Call, x, w, bias, nd: _NonDiff):
    """Strip schedule: the loss and its gradients in one pass over the token blocks."""
    plan = call.plan
    n = plan.n
    batch = x.shape[:-1]
    inp = _prepare(call, x, w, bias, nd)
    scale = jnp.ones((), plan.cdtype)
    if call.reduction == "mean":
        has_class = _rows_with_a_class(call, bias, nd, n)
        valid_pre = _rows_to_blocks(plan, has_class, False) & inp.keep
        den_pre = jnp.sum(_denominator_weights(plan, inp, valid_pre))
        if call.data_axes:
            den_pre = lax.psum(den_pre, call.data_axes)
        scale = jnp.where(den_pre > 0, 1 / jnp.where(den_pre > 0, den_pre, 1), 0)
    row_scale = jnp.broadcast_to(scale, (plan.kn, plan.bn))
    (loss, lse, valid, arg), (dx4, dw4, db3) = _strip_pass(plan, inp, row_scale, True, True)
    total, den = jnp.sum(loss), jnp.sum(_denominator_weights(plan, inp, valid))
    if call.data_axes:
        total, den = lax.psum((total, den), call.data_axes)
    rows = tuple(_blocks_to_rows(plan, o).reshape(batch) for o in (lse, arg, valid))
    grads = _finish_grads(call, x, w, bias, dx4, dw4, db3)
    return (_reduce_total(call, total, den), *rows), grads


# ----------------------------------------------------------------------------------------------
# shard_map wrapping and custom VJPs
# ----------------------------------------------------------------------------------------------


def _spec_entry(axes: tuple[str, ...]):
    if not axes:
        return None
    return axes[0] if len(axes) == 1 else tuple(axes)


def _specs(call: _Call, nd: _NonDiff):
    from jax.sharding import PartitionSpec as P

    vocab = _spec_entry(call.vocab_axes)
    batch = tuple(call.batch_spec)
    nd_specs = _NonDiff(
        labels=P(*batch),
        example_mask=None if nd.example_mask is None else P(*batch),
        class_weights=None if nd.class_weights is None else P(vocab),
        class_mask=None
        if nd.class_mask is None
        else (P(None, vocab) if call.plan.cmask == "shared" else P(*batch, vocab)),
    )
    return {
        "x": P(*batch, None),
        "w": P(None, vocab),
        "bias": P(vocab),
        "rows": P(*batch),
        "scalar": P(),
        "nd": nd_specs,
    }


def _mapped(call: _Call, fn, in_specs, out_specs):
    if call.mesh is None:
        return functools.partial(fn, call)
    mapped = jax.shard_map(
        functools.partial(fn, call),
        mesh=call.mesh,
        in_specs=in_specs,
        out_specs=out_specs,
        check_vma=False,
    )
    explicit = jax.sharding.AxisType.Explicit
    if explicit not in tuple(getattr(call.mesh, "axis_types", ())):
        return mapped  # automatic axes: shard_map reshards its inputs itself

    def run(*args):
        # Explicit axes: inputs must already carry the shardings shard_map expects.
        args = jax.tree.map(
            lambda a, spec: _reshard(call.mesh, a, spec),
            args,
            tuple(in_specs),
            is_leaf=lambda t: t is None,
        )
        return mapped(*args)

    return run


def _reshard(mesh, a, spec):
    from jax.sharding import NamedSharding

    if a is None:
        return None
    a = jnp.asarray(a)
    current = getattr(jax.typeof(a).sharding, "spec", None)
    if current is not None and tuple(current) + (None,) * (a.ndim - len(current)) == tuple(spec) + (
        None,
    ) * (a.ndim - len(spec)):
        return a
    return jax.reshard(a, NamedSharding(mesh, spec))


def _bias_spec(sp, bias):
    return None if bias is None else sp["bias"]


def _forward_rows(call: _Call, x, w, bias, nd: _NonDiff):
    sp = _specs(call, nd)
    fn = _mapped(
        call,
        _local_forward,
        (sp["x"], sp["w"], _bias_spec(sp, bias), sp["nd"]),
        (sp["rows"],) * 8,
    )
    return fn(x, w, bias, nd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _rows_loss(call: _Call, x, w, bias, nd: _NonDiff):
    return _forward_rows(call, x, w, bias, nd)[:5]


def _rows_loss_fwd(call: _Call, x, w, bias, nd: _NonDiff):
    out = _forward_rows(call, x, w, bias, nd)
    loss, lse, arg, valid, denw, a, b, c = out
    return (loss, lse, arg, valid, denw), (x, w, bias, nd, lse, a, b, c)


def _rows_loss_bwd(call: _Call, res, cts):
    x, w, bias, nd, lse, a, b, c = res
    g = cts[0]
    sp = _specs(call, nd)
    fn = _mapped(
        call,
        _local_backward,
        (sp["x"], sp["w"], _bias_spec(sp, bias), sp["nd"]) + (sp["rows"],) * 5,
        (sp["x"], sp["w"], _bias_spec(sp, bias)),
    )
    dx, dw, db = fn(x, w, bias, nd, lse, a, b, c, g)
    return dx, dw, db, None


_rows_loss.defvjp(_rows_loss_fwd, _rows_loss_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _reduced_loss(call: _Call, x, w, bias, nd: _NonDiff):
    sp = _specs(call, nd)
    fn = _mapped(
        call,
        _local_reduced_primal,
        (sp["x"], sp["w"], _bias_spec(sp, bias), sp["nd"]),
        (sp["scalar"], sp["rows"], sp["rows"], sp["rows"]),
    )
    return fn(x, w, bias, nd)


def _reduced_loss_fwd(call: _Call, x, w, bias, nd: _NonDiff):
    sp = _specs(call, nd)
    fn = _mapped(
        call,
        _local_reduced_fwd,
        (sp["x"], sp["w"], _bias_spec(sp, bias), sp["nd"]),
        (
            (sp["scalar"], sp["rows"], sp["rows"], sp["rows"]),
            (sp["x"], sp["w"], _bias_spec(sp, bias)),
        ),
    )
    out, grads = fn(x, w, bias, nd)
    return out, grads


def _reduced_loss_bwd(call: _Call, grads, cts):
    g = cts[0]
    dx, dw, db = grads
    scale = lambda t: None if t is None else (g * t).astype(t.dtype)
    return scale(dx), scale(dw), scale(db), None


_reduced_loss.defvjp(_reduced_loss_fwd, _reduced_loss_bwd)


# ----------------------------------------------------------------------------------------------
# Public API
# ----------------------------------------------------------------------------------------------


def _static_float(name: str, value) -> float:
    if isinstance(value, jax.core.Tracer):
        raise TypeError(
            f"{name} must be a Python number for the fused loss (it selects code paths at "
            "trace time), got a traced value."
        )
    return float(value)


def _check_block(name: str, value: int | None) -> None:
    if value is not None and (not isinstance(value, int | np.integer) or value < 1):
        raise ValueError(f"{name} must be a positive integer or None, got {value!r}.")


def _split_where(where, batch_shape: tuple[int, ...], num_classes: int):
    """(class mask as [1, V] or batch + [V], example mask of the batch shape, mask kind)."""
    mask = v.as_mask("where", where)
    if mask is None:
        return None, None, None
    logits_shape = (*batch_shape, num_classes)
    if mask.ndim == len(logits_shape):
        v.check_broadcastable("where", mask, logits_shape, "logits (x @ w)")
        if all(s == 1 for s in mask.shape[:-1]):
            shared = jnp.broadcast_to(mask.reshape(1, -1), (1, num_classes))
            return shared, None, "shared"
        return jnp.broadcast_to(mask, logits_shape), None, "rows"
    v.check_broadcastable("where", mask, batch_shape, "the batch (x without its last axis)")
    return None, jnp.broadcast_to(mask, batch_shape), None


def linear_softmax_cross_entropy_with_integer_labels(
    x: ArrayLike,
    w: ArrayLike,
    labels: ArrayLike,
    *,
    bias: ArrayLike | None = None,
    where: ArrayLike | None = None,
    ignore_index: int | None = None,
    label_smoothing: float = 0.0,
    class_weights: ArrayLike | None = None,
    z_loss: float = 0.0,
    logit_softcap: float | None = None,
    reduction: v.Reduction = "none",
    return_aux: bool = False,
    block_size_tokens: int | None = None,
    block_size_vocab: int | None = None,
    mesh: Any = None,
    vocab_axis: str | tuple[str, ...] | None = None,
    batch_axis: str | tuple[str, ...] | None = None,
) -> jax.Array | tuple[jax.Array, LinearCrossEntropyAux]:
    r"""Softmax cross-entropy of the logits ``x @ w + bias``, without materialising them.

    Gives the same numbers (and gradients for ``x``, ``w`` and ``bias``) as
    ``softmax_cross_entropy_with_integer_labels(x @ w + bias, labels, ...)`` with the same
    options, while holding only one ``[block_size_tokens, block_size_vocab]`` block of logits at
    a time:

    .. math::
        z = \operatorname{softcap}(x W + b), \qquad
        \ell = (1 - \varepsilon)\, w_y \big(\operatorname{lse}(z) - z_y\big)
               + \frac{\varepsilon}{K} \sum_c w_c \big(\operatorname{lse}(z) - z_c\big)
               + \lambda_z \operatorname{lse}(z)^2

    with :math:`\operatorname{lse}(z) = \log \sum_c e^{z_c}` accumulated online over vocabulary
    tiles. The backward pass recomputes each block of logits from ``x`` and ``w`` (a custom
    VJP); with ``reduction="sum"`` / ``"mean"`` and the whole vocabulary in one tile (the
    default up to 65536 classes) the gradients are formed in the same pass as the loss, so the
    cost is that of the materialised loss, ``6 N D V`` FLOPs, instead of ``8 N D V``.

    Arrays sharded with a ``NamedSharding`` work under plain ``jax.jit``: ``w`` split along
    ``V`` (vocab-parallel) and/or ``x`` / ``labels`` split along tokens (data-parallel) give the
    single-device values and gradients, and no device ever holds more than its own block of
    logits (see :mod:`xent_jax._sharded`).

    Args:
      x: ``[..., D]`` inputs (hidden states), any float dtype; bfloat16 / float16 are multiplied
        with float32 accumulation and the loss is computed in float32.
      w: ``[D, V]`` output projection.
      labels: ``[...]`` integer labels (the shape of ``x`` without its last axis).
      bias: optional ``[V]`` bias; ``-inf`` entries mask classes.
      where: boolean mask. With the rank of the logits (``[..., V]``, e.g. ``mask[None, :]``
        for all tokens) it masks classes; with a lower rank it broadcasts to the batch shape
        and masks tokens (loss 0, gradient 0, left out of the mean). A class mask that differs
        per token costs ``N x V`` booleans.
      ignore_index: label value of tokens to ignore (e.g. ``-100``).
      label_smoothing: :math:`\varepsilon \in [0, 1)`, spread over the available classes.
      class_weights: ``[V]`` weight per class (treated as a constant: no gradient).
      z_loss: coefficient :math:`\lambda_z` of the squared log-normaliser.
      logit_softcap: if set to :math:`s`, logits become :math:`s \tanh(z / s)` first.
      reduction: ``"none"`` (per token, shape ``[...]``), ``"sum"``, or ``"mean"`` (divided by
        the summed :math:`w_y` of the valid tokens; 0.0 when there are none).
      return_aux: also return a :class:`LinearCrossEntropyAux` (per-token logsumexp and
        argmax, and the accuracy), computed in the same pass; aux outputs carry no gradient.
      block_size_tokens: at most this many tokens per block (default: as many as keep a block
        at 4M logits, up to 8192).
      block_size_vocab: at most this many classes per tile (default: the whole vocabulary up to
        65536 classes with ``reduction`` ``"sum"`` / ``"mean"``, else a 4M-logit block).
      mesh: optional mesh to ``shard_map`` over, with ``vocab_axis`` (the mesh axes ``w``'s
        classes are split over) and ``batch_axis`` (the mesh axes the first batch dimension is
        split over). Not needed when the arrays carry explicit shardings.
      vocab_axis: see ``mesh``.
      batch_axis: see ``mesh``.

    Returns:
      The loss (float32; float64 for float64 inputs), or ``(loss, aux)`` with ``return_aux``.

    Examples:
      >>> import jax, jax.numpy as jnp
      >>> import xent_jax
      >>> x = jnp.array([[1.0, 0.5], [0.0, -1.0], [2.0, 1.0]])
      >>> w = jnp.array([[1.0, 0.0, -1.0], [0.5, 2.0, 0.0]])
      >>> labels = jnp.array([0, 1, 2])
      >>> xent_jax.linear_softmax_cross_entropy_with_integer_labels(x, w, labels)
      Array([0.6335, 2.555 , 4.981 ], dtype=float32)
      >>> xent_jax.softmax_cross_entropy_with_integer_labels(x @ w, labels)
      Array([0.6335, 2.555 , 4.981 ], dtype=float32)
      >>> loss, aux = xent_jax.linear_softmax_cross_entropy_with_integer_labels(
      ...     x, w, labels, reduction="mean", return_aux=True, block_size_tokens=2)
      >>> loss, aux.argmax, aux.accuracy
      (Array(2.7231, dtype=float32), Array([0, 2, 0], dtype=int32), Array(0.33333, dtype=float32))
      >>> jax.grad(xent_jax.linear_softmax_cross_entropy_with_integer_labels, argnums=1)(
      ...     x, w, labels, reduction="mean").shape
      (2, 3)
    """
    from xent_jax import _sharded

    x = v.as_float_array("x", x)
    w = v.as_float_array("w", w)
    if x.ndim < 1:
        raise ValueError(f"x must have at least one dimension (features), got shape {x.shape}.")
    if w.ndim != 2 or w.shape[0] != x.shape[-1]:
        raise ValueError(
            f"w must have shape [D, V] with D = x.shape[-1] = {x.shape[-1]}, got w.shape="
            f"{w.shape} (x.shape={x.shape})."
        )
    v.check_reduction(reduction)
    eps = _static_float("label_smoothing", label_smoothing)
    v.check_label_smoothing(eps)
    zl = _static_float("z_loss", z_loss)
    v.check_nonnegative("z_loss", zl)
    cap = None if logit_softcap is None else _static_float("logit_softcap", logit_softcap)
    if cap is not None:
        v.check_nonnegative("logit_softcap", cap)
    _check_block("block_size_tokens", block_size_tokens)
    _check_block("block_size_vocab", block_size_vocab)
    batch_shape, num_classes = x.shape[:-1], w.shape[1]
    labels = v.as_integer_labels(labels)
    if labels.shape != batch_shape:
        raise ValueError(
            "labels must have the shape of x without its last axis: expected "
            f"{batch_shape}, got labels.shape={labels.shape} (x.shape={x.shape})."
        )
    if bias is not None:
        bias = v.as_float_array("bias", bias)
        if bias.shape != (num_classes,):
            raise ValueError(f"bias must have shape ({num_classes},), got {bias.shape}.")
    weights = v.check_class_weights(class_weights, num_classes)
    class_mask, example_mask, cmask_kind = _split_where(where, batch_shape, num_classes)
    cdtype = v.compute_dtype(x.dtype, w.dtype)

    n_total = math.prod(batch_shape)
    if n_total == 0 or num_classes == 0:
        return _empty(batch_shape, reduction, cdtype, return_aux, labels)

    layout = _sharded.resolve_layout(
        x, w, 1, mesh=mesh, vocab_axis=vocab_axis, batch_axis=batch_axis
    )
    _, n_local, v_local = _local_sizes(layout, batch_shape, num_classes)
    # Block sizes are global: on a mesh each device holds its share of a block.
    bn_max, bv_max = _default_blocks(n_total, num_classes, reduction)
    bn_max = max(1, (block_size_tokens or bn_max) * n_local // n_total)
    bv_max = max(1, (block_size_vocab or bv_max) * v_local // num_classes)
    factor = layout.auto_factor if layout.mesh is None else 1
    pn, kn, bc = _split(n_local, bn_max, factor)
    pv, kv, tc = _split(v_local, bv_max, factor)
    padded_classes = kv * tc != v_local // pv
    if cmask_kind is None and padded_classes:
        cmask_kind = "shared"
    plan = _Plan(
        eps=eps,
        z_loss=zl,
        softcap=cap,
        has_bias=bias is not None,
        has_cw=weights is not None,
        cmask=cmask_kind,
        has_example_mask=example_mask is not None,
        ignore_index=None if ignore_index is None else int(ignore_index),
        aux=bool(return_aux),
        cdtype=np.dtype(cdtype),
        n=n_local,
        pn=pn,
        kn=kn,
        bc=bc,
        v=v_local,
        pv=pv,
        kv=kv,
        tc=tc,
        v_global=num_classes,
        vocab_axes=layout.vocab_axes or None,
        data_axes=layout.data_axes or None,
    )
    call = _Call(
        plan=plan,
        reduction=reduction,
        mesh=layout.mesh,
        batch_spec=layout.batch_spec,
        data_axes=layout.data_axes,
        vocab_axes=layout.vocab_axes,
    )
    nd = _NonDiff(labels, example_mask, weights, class_mask)
    if reduction != "none" and kv == 1:
        loss, lse, arg, valid = _reduced_loss(call, x, w, bias, nd)
    else:
        loss, lse, arg, valid, denw = _rows_loss(call, x, w, bias, nd)
        loss = reduce_loss(loss, reduction, denominator_weights=denw)
    if not return_aux:
        return loss
    return loss, _make_aux(lse, arg, valid, labels, cdtype)


def _make_aux(lse, arg, valid, labels, cdtype) -> LinearCrossEntropyAux:
    lse, arg, valid = (lax.stop_gradient(a) for a in (lse, arg, valid))
    correct = jnp.sum((arg == labels) & valid, dtype=cdtype)
    count = jnp.sum(valid, dtype=cdtype)
    accuracy = jnp.where(count > 0, correct / jnp.where(count > 0, count, 1), 0)
    return LinearCrossEntropyAux(lse.astype(cdtype), arg.astype(jnp.int32), accuracy)


def _empty(batch_shape, reduction, cdtype, return_aux, labels):
    loss = jnp.zeros(batch_shape, cdtype)
    if reduction != "none":
        loss = jnp.zeros((), cdtype)
    if not return_aux:
        return loss
    aux = LinearCrossEntropyAux(
        jnp.zeros(batch_shape, cdtype), jnp.zeros(batch_shape, jnp.int32), jnp.zeros((), cdtype)
    )
    return loss, aux


def _local_sizes(layout, batch_shape: tuple[int, ...], num_classes: int):
    from xent_jax._sharded import axes_of, axes_size

    if layout.mesh is None:
        return batch_shape, math.prod(batch_shape), num_classes
    local = []
    for dim, entry in zip(batch_shape, layout.batch_spec, strict=True):
        size = axes_size(layout.mesh, axes_of(entry))
        if dim % size:
            raise ValueError(
                f"a batch dimension of size {dim} is split over mesh axes {axes_of(entry)} of "
                f"size {size}, which does not divide it."
            )
        local.append(dim // size)
    vsize = axes_size(layout.mesh, layout.vocab_axes)
    if num_classes % vsize:
        raise ValueError(
            f"V={num_classes} classes are split over mesh axes {layout.vocab_axes} of size "
            f"{vsize}, which does not divide it."
        )
    return tuple(local), math.prod(local), num_classes // vsize
