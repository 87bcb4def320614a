"""Which formulation of the row statistics runs on which platform, and the documented switch
that overrides the choice.

The softmax losses have two formulations of their row statistics with the same values to
rounding: the CPU one (a sum of exponentials around a hint, with a careful fallback) and the
one-pass "online" one of :mod:`xent_jax._online` for GPUs and TPUs. :func:`by_platform` picks
per lowering platform; :func:`softmax_formulation` forces one of them everywhere, for tests
(CI has only CPUs) and for benchmarks that compare the two.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterator
from typing import Literal

import jax
import jax.numpy as jnp
from jax import lax

from xent_jax._validation import is_traced

Formulation = Literal["per_platform", "cpu", "one_pass"]
_FORMULATIONS = ("per_platform", "cpu", "one_pass")
_CURRENT: contextvars.ContextVar[str] = contextvars.ContextVar(
    "xent_jax_softmax_formulation", default="per_platform"
)


@contextlib.contextmanager
def softmax_formulation(name: Formulation) -> Iterator[None]:
    """Forces one formulation of the softmax losses' row statistics inside the context.

    ``"per_platform"`` (the default) uses the CPU formulation on CPUs and the one-pass
    formulation on GPUs and TPUs (float32 / float64 logits; half precision always takes the
    CPU one, which is faster there). ``"cpu"`` and ``"one_pass"`` use that formulation on every
    platform. Values agree to rounding either way; only speed differs. The choice is made while
    tracing, so JAX's compilation caches are cleared on entry and on exit (a function traced
    under one formulation is never reused under another).

    Args:
      name: ``"per_platform"``, ``"cpu"`` or ``"one_pass"``.

    Examples:
      >>> import jax.numpy as jnp
      >>> import xent_jax
      >>> with xent_jax.softmax_formulation("one_pass"):
      ...     xent_jax.softmax_cross_entropy_with_integer_labels(
      ...         jnp.array([[2.0, 1.0, 0.1]]), jnp.array([0]))
      Array([0.41703...], dtype=float32)
    """
    if name not in _FORMULATIONS:
        raise ValueError(f"softmax_formulation must be one of {_FORMULATIONS}, got {name!r}.")
    jax.clear_caches()
    token = _CURRENT.set(name)
    try:
        yield
    finally:
        _CURRENT.reset(token)
        jax.clear_caches()


def pays_off(dtype) -> bool:
    """Whether accelerators use the one-pass formulation for logits of this dtype."""
    return _CURRENT.get() == "one_pass" or jnp.dtype(dtype).itemsize >= 4


def by_platform(cpu, accelerator, *args):
    """``cpu(*args)`` when lowering for the CPU, ``accelerator(*args)`` for a GPU or TPU.

    Under a trace the choice is made per lowering platform (``lax.platform_dependent``: only
    the chosen branch is compiled). Eagerly, the arrays' devices decide, without a ``switch``
    (whose fresh closures would be recompiled at every eager call). Inside
    :func:`softmax_formulation` the forced formulation runs everywhere.
    """
    forced = _CURRENT.get()
    if forced != "per_platform":
        return cpu(*args) if forced == "cpu" else accelerator(*args)
    leaves = jax.tree_util.tree_leaves(args)
    if any(is_traced(x) for x in leaves):
        return lax.platform_dependent(*args, cpu=cpu, default=accelerator)
    platforms = {d.platform for x in leaves if isinstance(x, jax.Array) for d in x.devices()}
    return cpu(*args) if platforms <= {"cpu"} else accelerator(*args)
