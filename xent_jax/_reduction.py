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
      ``values`` unchanged, their sum, or their weighted mean (0.0 when the weights sum to 0).
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
    # Double where: the division never sees a zero, so its gradient stays finite too.
    safe = jnp.where(denominator > 0, denominator, 1)
    return jnp.where(denominator > 0, total / safe, 0)
