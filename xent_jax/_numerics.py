"""Small numerically careful primitives (0·log 0 = 0 and 0^γ with finite gradients) and the
fast-or-careful switch and per-pass upcast that the fused losses share."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from xent_jax._validation import compute_dtype, is_traced


def xlogy(x: jax.Array, y: jax.Array) -> jax.Array:
    """``x * log(y)``, exactly 0 where ``x == 0`` (whatever ``y``), with finite gradients there.

    ``jax.scipy.special.xlogy`` returns the right value at ``x = 0`` but its gradient with respect
    to ``x`` is ``log(0) = -inf`` where ``y = 0`` too, which turns into NaN downstream (for
    example through a softmax with a masked logit). Here that gradient is defined as 0; where
    ``y`` is a positive normal number it stays ``log(y)`` (``x * log(y)`` is linear in ``x``).
    """
    # Double where: log never sees a y that is 0, subnormal (flushed to 0 by XLA's log on CPU)
    # or not finite where x is 0, so no inf reaches the gradient; every other y keeps
    # d/dx = log(y).
    normal = (y >= jnp.finfo(y.dtype).tiny) & (y < jnp.inf)
    unused = (x == 0) & ~normal
    return x * jnp.log(jnp.where(unused, 1, y))


def safe_power(base: jax.Array, exponent: float) -> jax.Array:
    """``base ** exponent`` for ``base >= 0``, with a finite (zero) gradient at ``base = 0``."""
    if not is_traced(exponent) and float(exponent) == 0.0:
        return jnp.ones_like(base)
    zero = base == 0
    # Double where: the power never sees 0, whose derivative is infinite for exponent < 1.
    # Only an exact 0 is special-cased, so a NaN base stays NaN (loud, never silently 0).
    return jnp.where(zero, 0, jnp.power(jnp.where(zero, 1, base), exponent))


def fast_or_careful(ok, fast, careful):
    """``fast()`` if ``ok`` else ``careful()``: ``lax.cond`` under a trace, a Python branch when
    ``ok`` is concrete (an eager call would otherwise recompile the cond's fresh closures every
    time, ~0.1 s per call)."""
    if is_traced(ok):
        return jax.lax.cond(ok, fast, careful)
    return fast() if bool(ok) else careful()


def upcast_alias(x: jax.Array, tag: int, dtype=None, *, tie: jax.Array | None = None) -> jax.Array:
    """``x`` upcast (to ``dtype``, by default its compute dtype) through an opaque alias of a
    narrower input (no copy is made).

    XLA:CPU fuses an upcast into a reduction or an elementwise pass only while nothing else
    uses that upcast (or the input, for a gather): a shared one is written out in full as a
    float32 copy. Each pass therefore upcasts its own alias; distinct ``tag`` values keep XLA
    from merging the aliases again, mostly: two aliases of one array with constant tags have
    been seen merged (``BENCHMARKS.md``). ``tie``, a value computed from ``x`` that the pass
    uses anyway, replaces the tag and keeps that alias apart where the tag did not.
    """
    dtype = compute_dtype(x.dtype) if dtype is None else dtype
    if x.dtype != dtype:
        companion = jnp.asarray(tag, jnp.int32) if tie is None else tie
        x = jax.lax.optimization_barrier((x, companion))[0]
    return x.astype(dtype)
