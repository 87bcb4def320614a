"""Trace-time argument checks shared by every loss.

Every check runs on static information (shapes, dtypes, Python scalars), so it raises while the
function is being traced, before anything runs, and names the argument it is unhappy with.
"""

from __future__ import annotations

from typing import Literal

import jax
import jax.numpy as jnp
import numpy as np
from jax.core import Tracer
from jax.typing import ArrayLike

Reduction = Literal["none", "sum", "mean"]
_REDUCTIONS = ("none", "sum", "mean")


def is_traced(value: object) -> bool:
    """Whether ``value`` is a tracer (under ``jit``, ``grad``, ``vmap``...), so not concrete."""
    return isinstance(value, Tracer)


def check_reduction(reduction: str) -> None:
    if reduction not in _REDUCTIONS:
        raise ValueError(f"reduction must be one of {_REDUCTIONS}, got {reduction!r}.")


def check_label_smoothing(label_smoothing: float) -> None:
    if is_traced(label_smoothing):
        return  # A traced value cannot be checked here; it is the caller's to keep in range.
    value = float(label_smoothing)
    if not 0.0 <= value < 1.0:
        raise ValueError(f"label_smoothing must be in [0, 1), got {label_smoothing!r}.")


def check_nonnegative(name: str, value: float) -> None:
    if is_traced(value):
        return
    if float(value) < 0.0:
        raise ValueError(f"{name} must be >= 0, got {value!r}.")


def check_positive(name: str, value: float) -> None:
    if is_traced(value):
        return
    if not float(value) > 0.0:
        raise ValueError(f"{name} must be > 0, got {value!r}.")


def normalize_axis(axis: int, ndim: int, name: str = "logits") -> int:
    """``axis`` as a non-negative int; a float, bool or out-of-range axis raises."""
    if isinstance(axis, bool) or not isinstance(axis, int | np.integer):
        raise TypeError(f"axis must be an integer, got {axis!r} ({type(axis).__name__}).")
    if not -ndim <= axis < ndim:
        raise ValueError(f"axis={axis} is out of range for {name} of rank {ndim}.")
    return int(axis) % ndim


def normalize_class_axes(axis, ndim: int, name: str = "logits") -> int | tuple[int, ...]:
    """An int axis, or a tuple of distinct axes (the classes span them jointly, as in optax)."""
    if isinstance(axis, tuple | list):
        if not axis:
            raise ValueError("axis must name at least one axis, got an empty tuple.")
        axes = tuple(normalize_axis(a, ndim, name) for a in axis)
        if len(set(axes)) != len(axes):
            raise ValueError(f"axis={tuple(axis)} names the same axis of {name} twice.")
        return axes[0] if len(axes) == 1 else axes
    return normalize_axis(axis, ndim, name)


def as_logits(value: ArrayLike, name: str = "logits") -> jax.Array:
    """A floating array with at least one dimension (the class axis)."""
    array = as_float_array(name, value)
    if array.ndim == 0:
        raise ValueError(f"{name} must have at least one dimension (the class axis), got a scalar.")
    return array


def as_float_array(name: str, value: ArrayLike) -> jax.Array:
    """Converts ``value`` to an array and insists on a floating dtype."""
    array = jnp.asarray(value)
    if not jnp.issubdtype(array.dtype, jnp.floating):
        raise TypeError(
            f"{name} must have a floating dtype, got {array.dtype} with shape {array.shape}."
        )
    return array


def as_integer_labels(value: ArrayLike) -> jax.Array:
    """Integer labels as a ``jax.Array``.

    Host labels (NumPy, lists, torch tensors) wider than JAX's integers (int64 without x64)
    are saturated into the int32 range before conversion: a label beyond it stays out of range
    (NaN, or a hard error with ``validate_integer_labels``) instead of wrapping onto a class.
    """
    if not isinstance(value, jax.Array):
        host = np.asarray(value)
        if host.dtype.kind in "iu" and host.dtype.itemsize > 4 and not jax.enable_x64.value:
            info = np.iinfo(np.int32)
            if host.dtype.kind == "u":
                host = np.minimum(host, info.max).astype(np.int32)
            else:
                host = np.clip(host, info.min, info.max).astype(np.int32)
        value = host
    array = jnp.asarray(value)
    if not jnp.issubdtype(array.dtype, jnp.integer):
        raise TypeError(
            "labels must have an integer dtype for the integer-label API, got "
            f"{array.dtype} with shape {array.shape}; use the dense-label function for "
            "probabilities or one-hot targets."
        )
    return array


def compute_dtype(*dtypes) -> np.dtype:
    """float64 stays float64; every other float (half precision included) computes in float32."""
    result = jnp.result_type(*dtypes)
    return np.dtype(jnp.float64) if result == jnp.float64 else np.dtype(jnp.float32)


def check_same_shape(name_a: str, a: jax.Array, name_b: str, b: jax.Array) -> None:
    if a.shape != b.shape:
        raise ValueError(
            f"{name_a} and {name_b} must have the same shape, got {name_a}.shape={a.shape} "
            f"and {name_b}.shape={b.shape}."
        )


def check_broadcastable(name: str, value: jax.Array, shape: tuple[int, ...], target: str) -> None:
    try:
        np.broadcast_shapes(value.shape, shape)
        ok = np.broadcast_shapes(value.shape, shape) == tuple(shape)
    except ValueError:
        ok = False
    if not ok:
        raise ValueError(
            f"{name} with shape {value.shape} does not broadcast to {target} shape {tuple(shape)}."
        )


def check_class_weights(class_weights: ArrayLike | None, num_classes: int) -> jax.Array | None:
    if class_weights is None:
        return None
    weights = as_float_array("class_weights", class_weights)
    if weights.shape != (num_classes,):
        raise ValueError(
            f"class_weights must have shape ({num_classes},) (one weight per class), got "
            f"{weights.shape}."
        )
    return weights


def as_mask(name: str, where: ArrayLike | None) -> jax.Array | None:
    if where is None:
        return None
    mask = jnp.asarray(where)
    if mask.dtype != jnp.bool_:
        raise TypeError(f"{name} must be a boolean mask, got dtype {mask.dtype}.")
    return mask
