"""Integer labels: shape checks, ``ignore_index``, the NaN for invalid labels, and the opt-in hard
error (``validate_integer_labels`` + ``checked``) that works under ``jit``."""

from __future__ import annotations

import contextvars
import functools
from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import checkify
from jax.typing import ArrayLike

from xent_jax import _validation as v

# Whether a call is running inside a function wrapped by ``checked`` (whose checkify transform
# is what turns validate_integer_labels' check into an error).
_INSIDE_CHECKED: contextvars.ContextVar[bool] = contextvars.ContextVar(
    "xent_jax_inside_checked", default=False
)


class IntegerLabels(NamedTuple):
    """Attributes:
    safe: labels clipped into ``[0, K)`` so that gathers are legal.
    kept: False where the label equals ``ignore_index`` (``None`` without ``ignore_index``).
    invalid: True where the label is out of range and not ignored: that example becomes NaN.
    """

    safe: jax.Array
    kept: jax.Array | None
    invalid: jax.Array


def comparable_labels(labels: jax.Array) -> jax.Array:
    """Integer labels in a dtype where comparing them with ``num_classes`` or ``ignore_index``
    cannot wrap: their own for int32 / int64, int32 for narrower or unsigned dtypes.

    In uint8, 256 is 0 and -100 is 156; cast plainly, uint32 2**32 - 1 would be -1. The int32
    conversion saturates instead, so an out-of-range label stays out of range.
    """
    if jnp.issubdtype(labels.dtype, jnp.signedinteger) and labels.dtype.itemsize >= 4:
        return labels
    if labels.dtype.itemsize >= 4:  # unsigned
        labels = jnp.minimum(labels, np.iinfo(np.int32).max)
    return labels.astype(jnp.int32)


def prepare_integer_labels(
    labels: ArrayLike,
    *,
    batch_shape: tuple[int, ...],
    num_classes: int,
    ignore_index: int | None,
    what: str = "logits",
) -> IntegerLabels:
    labels = comparable_labels(v.as_integer_labels(labels))
    if labels.shape != tuple(batch_shape):
        raise ValueError(
            f"labels must have the shape of {what} without the class axis: expected "
            f"{tuple(batch_shape)}, got labels.shape={labels.shape}."
        )
    kept = None if ignore_index is None else labels != ignore_index
    in_range = (labels >= 0) & (labels < num_classes)
    invalid = ~in_range if kept is None else ~in_range & kept
    # Clipped only so the gather is legal; the caller turns invalid examples into NaN.
    return IntegerLabels(jnp.clip(labels, 0, num_classes - 1), kept, invalid)


def validate_integer_labels(
    labels: ArrayLike, num_classes: int, *, ignore_index: int | None = None
) -> jax.Array:
    """Returns ``labels`` unchanged, with a checkify check that they lie in ``[0, num_classes)``.

    The losses never raise on label values (they cannot under ``jit``): an invalid label gives
    NaN for its example. Pass labels through this function inside a function wrapped by
    :func:`checked` to turn that into a ``ValueError`` naming the first offending value and its
    position, also under ``jit``.

    Args:
      labels: integer labels of any shape.
      num_classes: the number of classes ``K``.
      ignore_index: a label value that is allowed although out of range.

    Returns:
      ``labels`` as a ``jax.Array``.

    Examples:
      >>> import jax, jax.numpy as jnp
      >>> import xent_jax
      >>> @xent_jax.checked
      ... @jax.jit
      ... def loss(logits, labels):
      ...     labels = xent_jax.validate_integer_labels(labels, logits.shape[-1])
      ...     return xent_jax.softmax_cross_entropy_with_integer_labels(logits, labels)
      >>> loss(jnp.zeros((3, 4)), jnp.array([0, 3, 1])).shape
      (3,)
      >>> loss(jnp.zeros((3, 4)), jnp.array([0, 7, 1]))
      Traceback (most recent call last):
        ...
      ValueError: invalid integer label 7 at position [1] of labels: outside [0, 4)
    """
    if not _INSIDE_CHECKED.get():
        raise RuntimeError(
            "validate_integer_labels must run inside a function wrapped by xent_jax.checked "
            "(outermost: `xent_jax.checked(jax.jit(f))`), which turns its check into a "
            "ValueError; without it the losses give NaN for invalid labels."
        )
    labels = v.as_integer_labels(labels)
    comparable = comparable_labels(labels)
    bad = (comparable < 0) | (comparable >= num_classes)
    if ignore_index is not None:
        bad = bad & (comparable != ignore_index)
    first = jnp.argmax(bad.ravel()) if labels.size else jnp.zeros((), jnp.int32)
    position = jnp.stack(jnp.unravel_index(first, labels.shape)) if labels.ndim else first
    value = labels.ravel()[first] if labels.size else jnp.zeros((), labels.dtype)
    # A concrete class count goes into the message as text (as an array argument, checkify
    # would print it as "TypedInt(4, dtype=int32)" outside jit).
    concrete = isinstance(num_classes, int | np.integer)
    bound = {} if concrete else {"num_classes": jnp.asarray(num_classes)}
    checkify.check(
        ~jnp.any(bad),
        "invalid integer label {value} at position {position} of labels: outside "
        f"[0, {int(num_classes) if concrete else '{num_classes}'})"
        + ("" if ignore_index is None else f" and is not ignore_index={ignore_index}"),
        position=position,
        value=value,
        debug=False,  # the default, named: else pyright matches ``**bound`` (arrays) to it
        **bound,
    )
    return labels


def checked(fn: Callable) -> Callable:
    """Wraps ``fn`` so that checks from :func:`validate_integer_labels` raise ``ValueError``.

    ``fn`` may be jitted (``checked(jax.jit(f))``) or not. The wrapper raises from Python, so it
    must be the outermost transformation: put ``jit``, ``vmap`` and ``grad`` inside it
    (``jax.jit(checked(f))`` fails while tracing). Without checks inside ``fn`` it only adds the
    checkify bookkeeping.
    """
    checked_fn = checkify.checkify(fn, errors=checkify.user_checks)

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        token = _INSIDE_CHECKED.set(True)
        try:
            error, out = checked_fn(*args, **kwargs)
        finally:
            _INSIDE_CHECKED.reset(token)
        message = error.get()
        if message is not None:
            # checkify appends where the check was traced; the first line is the user's message.
            raise ValueError(message.split("\n")[0].replace(" (`check` failed)", ""))
        return out

    return wrapper
