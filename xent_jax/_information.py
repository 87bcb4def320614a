"""Information-theoretic quantities of probability vectors: entropy, cross-entropy, KL and JS
divergences, binary entropy. 0·log 0 = 0 everywhere, with finite gradients."""

from __future__ import annotations

import math
import numbers

import jax
import jax.numpy as jnp
import numpy as np
from jax.typing import ArrayLike

from xent_jax import _validation as v
from xent_jax._numerics import xlogy


def _as_probs(name: str, p: ArrayLike) -> jax.Array:
    p = v.as_float_array(name, p)
    return p.astype(v.compute_dtype(p.dtype))


def _pair(p: ArrayLike, q: ArrayLike) -> tuple[jax.Array, jax.Array]:
    p, q = _as_probs("p", p), _as_probs("q", q)
    try:
        shape = np.broadcast_shapes(p.shape, q.shape)
    except ValueError:
        raise ValueError(
            f"p and q must have broadcastable shapes, got p.shape={p.shape} and q.shape={q.shape}."
        ) from None
    dtype = jnp.result_type(p.dtype, q.dtype)
    return jnp.broadcast_to(p, shape).astype(dtype), jnp.broadcast_to(q, shape).astype(dtype)


def _entry_mask(where: ArrayLike | None, shape: tuple[int, ...]) -> jax.Array | None:
    mask = v.as_mask("where", where)
    if mask is not None:
        v.check_broadcastable("where", mask, shape, "p")
    return mask


def _hidden(mask: jax.Array | None, x: jax.Array) -> jax.Array:
    """``x`` with masked entries at 0. Double where: a masked entry then computes as 0 log(.) = 0,
    so an inf or NaN there never meets the mask's zero cotangent (0 * inf = NaN)."""
    return x if mask is None else jnp.where(mask, x, 0)


def _sum(terms: jax.Array, axis: int, mask: jax.Array | None, base: float | None) -> jax.Array:
    axis = v.normalize_axis(axis, terms.ndim, "p")
    if mask is not None:
        terms = jnp.where(mask, terms, 0)
    total = jnp.sum(terms, axis=axis)
    if base is None:
        return total
    if v.is_traced(base):
        # Loud, never silently wrong: a traced base that is not positive or is 1 gives NaN.
        usable = (base > 0) & (base != 1)
        return total / jnp.log(jnp.where(usable, base, jnp.nan)).astype(total.dtype)
    return total / math.log(base)


def _check_base(base: float | None) -> None:
    """``None``, a number > 0 and != 1, or a traced scalar (checked at run time: NaN)."""
    if base is None:
        return
    if v.is_traced(base):
        if jnp.ndim(base):
            raise ValueError(f"base must be a scalar, got shape {jnp.shape(base)}.")
        return
    scalar_array = isinstance(base, np.ndarray | jax.Array) and np.ndim(base) == 0
    if isinstance(base, bool) or not (isinstance(base, numbers.Real) or scalar_array):
        raise TypeError(f"base must be a real number or None, got {base!r}.")
    if base <= 0 or base == 1:
        raise ValueError(f"base must be positive and not 1 (or None for nats), got {base!r}.")


def entropy(
    p: ArrayLike, *, axis: int = -1, base: float | None = None, where: ArrayLike | None = None
) -> jax.Array:
    r"""Shannon entropy of probability vectors along ``axis``.

    .. math::  H(p) = -\sum_i p_i \log p_i, \qquad 0 \log 0 = 0

    The gradient at :math:`p_i = 0` is taken as 0 (the one-sided derivative is infinite), so
    the entropy of a softmax with masked logits has finite gradients; ``jax.scipy.special.entr``
    gives NaN there.

    Args:
      p: ``[..., K, ...]`` probabilities (not renormalised).
      axis: the axis to sum over.
      base: logarithm base; ``None`` gives nats, ``2`` bits.
      where: boolean mask broadcastable to ``p``; masked entries leave the sum.

    Returns:
      ``p``'s shape without ``axis``, float32 (float64 for float64 input).

    Examples:
      >>> import jax.numpy as jnp
      >>> import xent_jax
      >>> xent_jax.entropy(jnp.array([0.75, 0.25]), base=2)  # England vs India
      Array(0.811278, dtype=float32)
    """
    _check_base(base)
    p = _as_probs("p", p)
    mask = _entry_mask(where, p.shape)
    p = _hidden(mask, p)
    # 0 - x rather than -x: a certain outcome has entropy 0, not -0.
    return 0.0 - _sum(xlogy(p, p), axis, mask, base)


def cross_entropy(
    p: ArrayLike,
    q: ArrayLike,
    *,
    axis: int = -1,
    base: float | None = None,
    where: ArrayLike | None = None,
) -> jax.Array:
    r"""Cross-entropy of ``q`` relative to ``p``.

    .. math::  H(p, q) = -\sum_i p_i \log q_i

    A term with :math:`p_i = 0` is 0 whatever :math:`q_i`; :math:`p_i > 0` with :math:`q_i = 0`
    gives ``+inf``. Neither input is renormalised.

    Args:
      p: ``[..., K, ...]`` the true distribution.
      q: the predicted distribution, broadcastable with ``p``.
      axis: the axis to sum over.
      base: logarithm base; ``None`` gives nats, ``2`` bits.
      where: boolean mask broadcastable to ``p``; masked entries leave the sum.

    Returns:
      The broadcast shape without ``axis``.

    Examples:
      >>> import jax.numpy as jnp
      >>> import xent_jax
      >>> xent_jax.cross_entropy(jnp.array([1.0, 0, 0, 0]),
      ...                        jnp.array([0.775, 0.116, 0.039, 0.070]), base=2)
      Array(0.367732, dtype=float32)
    """
    _check_base(base)
    p, q = _pair(p, q)
    mask = _entry_mask(where, p.shape)
    p = _hidden(mask, p)
    return _sum(-xlogy(p, q), axis, mask, base)


def kl_divergence(
    p: ArrayLike,
    q: ArrayLike,
    *,
    axis: int = -1,
    base: float | None = None,
    where: ArrayLike | None = None,
) -> jax.Array:
    r"""Kullback-Leibler divergence :math:`D_{KL}(p \,\|\, q)` (``scipy.special.rel_entr``
    summed).

    .. math::  D_{KL}(p \,\|\, q) = \sum_i p_i \log \frac{p_i}{q_i}

    Args:
      p: ``[..., K, ...]`` the reference distribution.
      q: the approximating distribution, broadcastable with ``p``.
      axis: the axis to sum over.
      base: logarithm base; ``None`` gives nats, ``2`` bits.
      where: boolean mask broadcastable to ``p``; masked entries leave the sum.

    Returns:
      The broadcast shape without ``axis``; ``+inf`` where :math:`p_i > 0 = q_i`.

    Examples:
      >>> import jax.numpy as jnp
      >>> import xent_jax
      >>> xent_jax.kl_divergence(jnp.array([0.5, 0.5]), jnp.array([0.9, 0.1]))
      Array(0.510826, dtype=float32)
    """
    _check_base(base)
    p, q = _pair(p, q)
    mask = _entry_mask(where, p.shape)
    p = _hidden(mask, p)
    # p log p - p log q rather than p log(p / q): each term keeps its own 0 log 0 = 0 rule.
    return _sum(xlogy(p, p) - xlogy(p, q), axis, mask, base)


def js_divergence(
    p: ArrayLike,
    q: ArrayLike,
    *,
    axis: int = -1,
    base: float | None = None,
    where: ArrayLike | None = None,
) -> jax.Array:
    r"""Jensen-Shannon divergence, symmetric and bounded by :math:`\log 2`.

    .. math::
        D_{JS}(p, q) = \tfrac12 D_{KL}(p \,\|\, m) + \tfrac12 D_{KL}(q \,\|\, m),
        \qquad m = \tfrac12 (p + q)

    Args:
      p: ``[..., K, ...]`` a distribution.
      q: another, broadcastable with ``p``.
      axis: the axis to sum over.
      base: logarithm base; ``None`` gives nats (at most :math:`\log 2`), ``2`` bits (at most 1).
      where: boolean mask broadcastable to ``p``; masked entries leave the sum.

    Returns:
      The broadcast shape without ``axis``.

    Examples:
      >>> import jax.numpy as jnp
      >>> import xent_jax
      >>> xent_jax.js_divergence(jnp.array([1.0, 0.0]), jnp.array([0.0, 1.0]), base=2)
      Array(1., dtype=float32)
    """
    _check_base(base)
    p, q = _pair(p, q)
    mask = _entry_mask(where, p.shape)
    p, q = _hidden(mask, p), _hidden(mask, q)
    m = 0.5 * (p + q)
    terms = 0.5 * (xlogy(p, p) - xlogy(p, m) + xlogy(q, q) - xlogy(q, m))
    return _sum(terms, axis, mask, base)


def binary_entropy(p: ArrayLike, *, base: float | None = None) -> jax.Array:
    r"""Elementwise entropy of a Bernoulli(p) variable.

    .. math::  H_b(p) = -p \log p - (1 - p) \log (1 - p)

    Args:
      p: ``[...]`` probabilities of success.
      base: logarithm base; ``None`` gives nats, ``2`` bits.

    Returns:
      ``p``'s shape; 0 at ``p`` = 0 and 1, with finite gradients there.

    Examples:
      >>> import jax.numpy as jnp
      >>> import xent_jax
      >>> xent_jax.binary_entropy(jnp.array([0.5, 0.75, 1.0]), base=2)
      Array([1.       , 0.8112781, 0.       ], dtype=float32)
    """
    _check_base(base)
    p = _as_probs("p", p)
    # 0 - x rather than -x: a certain outcome has entropy 0, not -0.
    h = 0.0 - (xlogy(p, p) + xlogy(1 - p, 1 - p))
    return h if base is None else h / math.log(base)
