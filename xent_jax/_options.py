"""The options of the softmax cross-entropy family, parsed and validated in one place.

Every path of the family (the plain losses, the vocab-parallel loss, the fused linear loss and
``xent_jax.analytic``) builds one :class:`SoftmaxOptions` at its public boundary with
:func:`softmax_options` and passes that object on; nothing below the boundary reads a raw
keyword. So every path accepts the same values, gives the same errors, and treats traced values
the same way:

* ``label_smoothing`` and ``z_loss`` may be traced (arguments of a jitted function) on every
  path. A traced value cannot be range-checked while tracing; an out-of-range one gives NaN
  (loud) instead of a silently wrong loss.
* ``logit_softcap``, ``temperature`` and ``ignore_index`` pick code paths and must be Python
  numbers (or NumPy scalars): a traced value raises ``TypeError`` on every path.
* ``reduction``, ``class_weights`` (length ``K``) and the numbers' ranges are checked while
  tracing, with messages that name the argument.
"""

from __future__ import annotations

import dataclasses
import numbers
from typing import Literal, overload

import jax
import jax.numpy as jnp
import numpy as np
from jax.typing import ArrayLike

from xent_jax import _validation as v


@dataclasses.dataclass(frozen=True)
class SoftmaxOptions:
    """The validated options of one softmax cross-entropy call.

    Attributes:
      reduction: ``"none"``, ``"sum"`` or ``"mean"``.
      ignore_index: the label value of ignored examples (a Python int), or ``None``.
      label_smoothing: scalar array in the compute dtype (possibly traced), or ``None`` when it
        is statically 0 (the smoothing code is then left out).
      z_loss: scalar array in the compute dtype (possibly traced), or ``None`` when statically 0.
      logit_softcap: the soft cap ``s > 0`` (a Python float), or ``None``.
      class_weights: ``[K]`` weights in the compute dtype, or ``None``.
      temperature: ``T > 0`` (a Python float; ``None`` for 1): the softmax sees
        ``softcap(z) / T``.
    """

    reduction: str
    ignore_index: int | None
    label_smoothing: jax.Array | None
    z_loss: jax.Array | None
    logit_softcap: float | None
    class_weights: jax.Array | None
    temperature: float | None = None

    @property
    def smoothing(self) -> bool:
        return self.label_smoothing is not None

    @property
    def scale(self) -> float | None:
        """``1 / T``, the factor on the raw logits, or ``None`` without a temperature."""
        return None if self.temperature is None else 1.0 / self.temperature

    @property
    def scaled_softcap(self) -> float | None:
        """The soft cap of the scaled logits: ``softcap(z) / T = (s / T) tanh((z / T) / (s / T))``,
        so a temperature is a scale of the logits and of the cap."""
        if self.logit_softcap is None or self.temperature is None:
            return self.logit_softcap
        return self.logit_softcap / self.temperature


def _scalar(name: str, value, dtype, low: float, high: float | None) -> jax.Array | None:
    """A scalar option as an array in ``dtype``; ``None`` when it is statically 0.

    A concrete value outside ``[low, high)`` (``[low, inf)`` without ``high``) raises; a traced
    one becomes NaN there, since it cannot raise under ``jit``.
    """
    if isinstance(value, bool) or not (v.is_traced(value) or _is_number_like(value)):
        raise TypeError(f"{name} must be a real number, got {value!r}.")
    if np.ndim(value):
        raise ValueError(f"{name} must be a scalar, got an array of shape {np.shape(value)}.")
    bound = f"[{low}, {high})" if high is not None else f">= {low}"
    if not v.is_traced(value):
        # Converted on the host: jnp.asarray would stage a constant under jit.
        number = float(np.asarray(value))
        if not (low <= number and (high is None or number < high)):
            raise ValueError(f"{name} must be in {bound}, got {value!r}.")
        if number == 0.0:
            return None
        return jnp.asarray(number, dtype)
    array = jnp.asarray(value)
    array = array.astype(dtype)
    in_range = array >= low if high is None else (array >= low) & (array < high)
    # Loud, never silently wrong: a traced value out of range makes the loss NaN.
    return jnp.where(in_range, array, jnp.nan)


def _is_number_like(value) -> bool:
    if isinstance(value, numbers.Real):
        return True
    return isinstance(value, np.ndarray | jax.Array) and np.ndim(value) == 0


@overload
def _static_number(name: str, value, *, integer: Literal[True]) -> int: ...
@overload
def _static_number(name: str, value, *, integer: Literal[False]) -> float: ...
def _static_number(name: str, value, *, integer: bool) -> int | float:
    """A Python int / float from an option that selects code paths (no traced values)."""
    if v.is_traced(value):
        raise TypeError(
            f"{name} must be a Python number, not a traced value: it selects code paths while "
            "tracing (pass it as a static argument, e.g. with functools.partial)."
        )
    if isinstance(value, bool) or not _is_number_like(value):
        raise TypeError(
            f"{name} must be a {'integer' if integer else 'real number'}, got {value!r}."
        )
    if integer:
        if isinstance(value, np.ndarray | jax.Array):
            if not jnp.issubdtype(value.dtype, jnp.integer):
                raise TypeError(f"{name} must be an integer, got {value!r}.")
        elif not isinstance(value, numbers.Integral):
            raise TypeError(f"{name} must be an integer, got {value!r}.")
        return int(value)
    return float(value)


def softmax_options(
    *,
    num_classes: int,
    dtype,
    reduction: str = "none",
    ignore_index: int | None = None,
    label_smoothing: float | ArrayLike = 0.0,
    class_weights: ArrayLike | None = None,
    z_loss: float | ArrayLike = 0.0,
    logit_softcap: float | None = None,
    temperature: float = 1.0,
) -> SoftmaxOptions:
    """Validates the options of a softmax cross-entropy call over ``num_classes`` classes.

    Args:
      num_classes: ``K``, the length ``class_weights`` must have.
      dtype: the compute dtype (float32, or float64 under x64).
      reduction: see :class:`SoftmaxOptions`.
      ignore_index: see :class:`SoftmaxOptions`.
      label_smoothing: a number in ``[0, 1)``, possibly traced.
      class_weights: ``[K]`` floats, or ``None``.
      z_loss: a number ``>= 0``, possibly traced.
      logit_softcap: ``None`` or a number ``> 0``.
      temperature: a number ``> 0``.

    Returns:
      The options as a :class:`SoftmaxOptions`.
    """
    v.check_reduction(reduction)
    if num_classes < 1:
        raise ValueError(
            "the class axis is empty (K = 0 classes): a softmax needs at least one class."
        )
    if ignore_index is not None:
        ignore_index = _static_number("ignore_index", ignore_index, integer=True)
    if logit_softcap is not None:
        logit_softcap = _static_number("logit_softcap", logit_softcap, integer=False)
        if not logit_softcap > 0.0:
            raise ValueError(f"logit_softcap must be > 0 (or None), got {logit_softcap!r}.")
    temperature = _static_number("temperature", temperature, integer=False)
    if not temperature > 0.0:
        raise ValueError(f"temperature must be > 0, got {temperature!r}.")
    weights = v.check_class_weights(class_weights, num_classes)
    return SoftmaxOptions(
        reduction=reduction,
        ignore_index=ignore_index,
        label_smoothing=_scalar("label_smoothing", label_smoothing, dtype, 0.0, 1.0),
        z_loss=_scalar("z_loss", z_loss, dtype, 0.0, None),
        logit_softcap=logit_softcap,
        class_weights=None if weights is None else weights.astype(dtype),
        temperature=None if temperature == 1.0 else temperature,
    )
