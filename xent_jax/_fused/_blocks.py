"""Block planning and array views: how the tokens and the classes are cut into blocks.

A block of tokens is ``pn`` equal runs of ``bc`` consecutive rows, one from each of ``pn`` equal
chunks of the token axis; a vocabulary tile is likewise ``pv`` runs of ``tc`` classes (see the
package docstring). The helpers here move arrays between their natural layout and that block
layout, and pick out block ``i`` / tile ``j`` inside the loops.
"""

from __future__ import annotations

import dataclasses
from typing import Any, overload

import jax
import jax.numpy as jnp
from jax import lax

from xent_jax import _validation as v

# Default block sizes: a [tokens, classes] block of at most _BLOCK_ELEMENTS float32 values
# (16 MiB), tokens first (large token blocks keep the dW matmul, which contracts over tokens,
# efficient), vocabulary tiles of at least _MIN_VOCAB_TILE classes.
_BLOCK_ELEMENTS = 1 << 22
_MAX_TOKEN_BLOCK = 8192
_MIN_VOCAB_TILE = 512
# The strip schedule is the default while a block of _STRIP_MIN_TOKENS tokens over the whole
# vocabulary fits in _BLOCK_ELEMENTS.
_STRIP_MIN_TOKENS = 64


@dataclasses.dataclass(frozen=True)
class Plan:
    """Everything static about one call: options, layout and block sizes (local to a device)."""

    smoothing: bool  # label smoothing on (its value is an input: it may be traced)
    has_z_loss: bool  # z-loss on (likewise)
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
    precision: Any = None  # jax.lax.Precision of the three products (None: JAX's default)
    scale: float | None = None  # 1 / temperature applied to x @ w + bias (None: 1)

    @property
    def bn(self) -> int:
        """Rows in a token block."""
        return self.pn * self.bc

    @property
    def bv(self) -> int:
        """Classes in a vocabulary tile."""
        return self.pv * self.tc

    @property
    def n_chunk(self) -> int:
        """Rows in each of the ``pn`` chunks of the token axis."""
        return self.n // self.pn

    @property
    def v_chunk(self) -> int:
        """Classes in each of the ``pv`` chunks of the class axis."""
        return self.v // self.pv

    @property
    def padded_rows(self) -> bool:
        """Whether the token blocks overrun the token axis (the last block is padded)."""
        return self.kn * self.bc != self.n_chunk

    @property
    def padded_classes(self) -> bool:
        """Whether the vocabulary tiles overrun the class axis (the last tile is padded)."""
        return self.kv * self.tc != self.v_chunk


def split_axis(length: int, max_block: int, layout: int) -> tuple[int, int, int]:
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


def default_blocks(n: int, v: int, reduction: str) -> tuple[int, int]:
    """Default (block_size_tokens, block_size_vocab)."""
    if reduction != "none" and v * _STRIP_MIN_TOKENS <= _BLOCK_ELEMENTS:
        # Strip: whole vocabulary per block, as many tokens as fit.
        return max(1, min(n, _BLOCK_ELEMENTS // max(v, 1))), v
    bn = max(1, min(n, _MAX_TOKEN_BLOCK))
    bv = max(_MIN_VOCAB_TILE, _BLOCK_ELEMENTS // bn)
    return bn, min(v, bv)


# ----------------------------------------------------------------------------------------------
# Per-token and per-class arrays: [rows] <-> [kn, bn] blocks, [classes] <-> [kv, bv] tiles
# ----------------------------------------------------------------------------------------------


def rows_to_blocks(plan: Plan, rows: jax.Array, fill) -> jax.Array:
    """``[n, ...]`` -> ``[kn, bn, ...]`` (padded with ``fill``)."""
    rest = rows.shape[1:]
    rows = rows.reshape(plan.pn, plan.n_chunk, *rest)
    if plan.padded_rows:
        pad = plan.kn * plan.bc - plan.n_chunk
        rows = jnp.pad(rows, [(0, 0), (0, pad)] + [(0, 0)] * len(rest), constant_values=fill)
    rows = rows.reshape(plan.pn, plan.kn, plan.bc, *rest)
    return jnp.swapaxes(rows, 0, 1).reshape(plan.kn, plan.bn, *rest)


def blocks_to_rows(plan: Plan, blocks: jax.Array) -> jax.Array:
    """Inverse of :func:`rows_to_blocks`."""
    rest = blocks.shape[2:]
    rows = jnp.swapaxes(blocks.reshape(plan.kn, plan.pn, plan.bc, *rest), 0, 1)
    rows = rows.reshape(plan.pn, plan.kn * plan.bc, *rest)
    if plan.padded_rows:
        rows = rows[:, : plan.n_chunk]
    return rows.reshape(plan.n, *rest)


def cols_to_tiles(plan: Plan, cols: jax.Array, fill) -> jax.Array:
    """``[..., v]`` -> ``[kv, ..., bv]`` (padded with ``fill``)."""
    lead = cols.shape[:-1]
    cols = cols.reshape(*lead, plan.pv, plan.v_chunk)
    if plan.padded_classes:
        pad = plan.kv * plan.tc - plan.v_chunk
        cols = jnp.pad(cols, [(0, 0)] * (len(lead) + 1) + [(0, pad)], constant_values=fill)
    cols = cols.reshape(*lead, plan.pv, plan.kv, plan.tc)
    cols = jnp.moveaxis(cols, -2, 0)
    return cols.reshape(plan.kv, *lead, plan.bv)


# ----------------------------------------------------------------------------------------------
# Operand views: x as [pn, kn, bc, D], w as [D, pv, kv, tc], picked from by block / tile index
# ----------------------------------------------------------------------------------------------


def x_view(plan: Plan, x: jax.Array) -> jax.Array:
    """``[n, D]`` -> ``[pn, kn, bc, D]`` (padded with zeros); block ``i`` is ``[:, i]``."""
    d = x.shape[-1]
    x = x.reshape(plan.pn, plan.n_chunk, d)
    if plan.padded_rows:
        x = jnp.pad(x, [(0, 0), (0, plan.kn * plan.bc - plan.n_chunk), (0, 0)])
    return x.reshape(plan.pn, plan.kn, plan.bc, d)


def x_unview(plan: Plan, x4: jax.Array) -> jax.Array:
    """Inverse of :func:`x_view`: ``[pn, kn, bc, D]`` -> ``[n, D]`` (padding dropped)."""
    d = x4.shape[-1]
    x = x4.reshape(plan.pn, plan.kn * plan.bc, d)
    if plan.padded_rows:
        x = x[:, : plan.n_chunk]
    return x.reshape(plan.n, d)


def x_block(plan: Plan, x4: jax.Array, i) -> jax.Array:
    """``[bn, D]``: token block ``i`` of the viewed inputs."""
    return _pick(x4, i, 1, plan.kn == 1, (plan.bn, x4.shape[-1]))


def xt_view(x4: jax.Array) -> jax.Array:
    """``[pn, kn, bc, D]`` -> ``[D, pn, kn, bc]``, transposed once outside the loops so that the
    weight-gradient product of every block is a plain (non-transposed) matrix product."""
    return jnp.transpose(x4, (3, 0, 1, 2))


def xt_block(plan: Plan, xt4: jax.Array, i) -> jax.Array:
    """``[D, bn]``: block ``i`` of the transposed inputs."""
    return _pick(xt4, i, 2, plan.kn == 1, (xt4.shape[0], plan.bn))


def w_view(plan: Plan, w: jax.Array) -> jax.Array:
    """``[D, v]`` -> ``[D, pv, kv, tc]`` (padded with zeros); tile ``j`` is ``[:, :, j]``."""
    d = w.shape[0]
    w = w.reshape(d, plan.pv, plan.v_chunk)
    if plan.padded_classes:
        w = jnp.pad(w, [(0, 0), (0, 0), (0, plan.kv * plan.tc - plan.v_chunk)])
    return w.reshape(d, plan.pv, plan.kv, plan.tc)


def w_unview(plan: Plan, w4: jax.Array) -> jax.Array:
    """Inverse of :func:`w_view`: ``[D, pv, kv, tc]`` -> ``[D, v]`` (padding dropped)."""
    d = w4.shape[0]
    w = w4.reshape(d, plan.pv, plan.kv * plan.tc)
    if plan.padded_classes:
        w = w[:, :, : plan.v_chunk]
    return w.reshape(d, plan.v)


def w_tile(plan: Plan, w4: jax.Array, j) -> jax.Array:
    """``[D, bv]``: vocabulary tile ``j`` of the viewed weights."""
    return _pick(w4, j, 2, plan.kv == 1, (w4.shape[0], plan.bv))


def bias_unview(plan: Plan, bias3: jax.Array) -> jax.Array:
    """``[pv, kv, tc]`` (the bias gradient's tile layout) -> ``[v]`` (padding dropped)."""
    bias = bias3.reshape(plan.pv, plan.kv * plan.tc)
    if plan.padded_classes:
        bias = bias[:, : plan.v_chunk]
    return bias.reshape(plan.v)


# ----------------------------------------------------------------------------------------------
# Loop helpers: static shortcuts when there is a single block or tile
# ----------------------------------------------------------------------------------------------


def _pick(view: jax.Array, index, axis: int, static_single: bool, shape) -> jax.Array:
    """Entry ``index`` along ``axis`` of an operand view, reshaped to the 2-D ``shape`` (just a
    reshape when that axis has a single entry)."""
    if static_single:
        return view.reshape(shape)
    entry = lax.dynamic_index_in_dim(view, index, axis=axis, keepdims=False)
    return entry.reshape(shape)


@overload
def take_block(array: jax.Array, i, static_single: bool) -> jax.Array: ...
@overload
def take_block(array: None, i, static_single: bool) -> None: ...
@overload
def take_block(array: jax.Array | None, i, static_single: bool) -> jax.Array | None: ...
def take_block(array: jax.Array | None, i, static_single: bool) -> jax.Array | None:
    """Entry ``i`` of the leading axis (``None`` stays ``None``); ``array[0]`` when static."""
    if array is None:
        return None
    if static_single:
        return array[0]
    return lax.dynamic_index_in_dim(array, i, axis=0, keepdims=False)


def put_block(array: jax.Array, value: jax.Array, i, static_single: bool) -> jax.Array:
    """``array`` with entry ``i`` of its leading axis set to ``value``."""
    if static_single:
        return value[None]
    return lax.dynamic_update_index_in_dim(array, value, i, axis=0)


def fori(n: int, body, carry):
    """``fori_loop`` that is a plain call when there is a single step (no while loop in HLO)."""
    if n == 1:
        return body(0, carry)
    return lax.fori_loop(0, n, body, carry)


def pad_class_mask(class_mask, kind: str | None, num_classes: int, pad: int):
    """(class mask, kind) with ``pad`` unavailable classes appended: padding columns that a
    vocabulary split over a mesh needs, which take no probability and match no label."""
    if class_mask is None:
        shared = jnp.arange(num_classes + pad) < num_classes
        return shared[None, :], "shared"
    widths = [(0, 0)] * (class_mask.ndim - 1) + [(0, pad)]
    return jnp.pad(class_mask, widths, constant_values=False), kind


def split_where_blocked(where, batch_shape: tuple[int, ...], num_classes: int):
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
