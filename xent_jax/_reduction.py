"""Reductions over per-example losses: ``"none"``, ``"sum"`` and a ``"mean"`` that is 0, not NaN,
when nothing is valid."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from xent_jax._validation import check_reduction


def reduce_loss(
    values: jax.Array, reduction: str, *, denominator_weights: jax.Array | None = None
) -> jax.Array:
    """Reduces per-example ``values``.

    Args:
      values: per-example losses, already 0 where an example is masked or ignored.
      reduction: ``"none"``, ``"sum"`` or ``"mean"``.
      denominator_weights: the weight each example carries in the mean's denominator (0 for
        masked / ignored examples); ``None`` means every example counts once.

    Returns:
      ``values`` unchanged, their sum, or their weighted mean (0.0 when the weights sum to
      exactly 0).
    """
    check_reduction(reduction)
    if reduction == "none":
        return values
    total = jnp.sum(values)
    if reduction == "sum":
        return total
    if denominator_weights is None:
        return total / values.size if values.size else jnp.zeros((), values.dtype)
    denominator = jnp.sum(denominator_weights).astype(values.dtype)
    # A mean over nothing (an exactly zero denominator) is 0; any other denominator divides,
    # a negative sum of class weights included (as PyTorch does).
    # Double where: the division never sees a zero, so its gradient stays finite too.
    nonzero = denominator != 0
    return jnp.where(nonzero, total / jnp.where(nonzero, denominator, 1), 0)
