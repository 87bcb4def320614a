r"""Closed-form gradients and Hessians of the logits losses, written without autodiff.

They are the textbook results — softmax minus target, sigmoid minus label, and
:math:`\operatorname{diag}(p) - p p^\top` — extended to every option the losses take (masks,
smoothing, class weights, z-loss, soft-capping, reductions). The tests check ``jax.grad`` and
``jax.hessian`` of each loss against them; they are also handy for hand-written training loops.

Each gradient is that of ``sum(loss)`` for ``reduction="none"`` or ``"sum"``, and of the mean for
``"mean"``. It is returned in float32 (float64 for float64 logits), in the logits' layout.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.typing import ArrayLike

from xent_jax import _validation as v
from xent_jax._labels import comparable_labels, prepare_integer_labels
from xent_jax._logits import split_where
from xent_jax._options import SoftmaxOptions, softmax_options

__all__ = [
    "sigmoid_binary_cross_entropy_grad",
    "softmax_cross_entropy_grad",
    "softmax_cross_entropy_hessian",
    "softmax_cross_entropy_with_integer_labels_grad",
]


def _softmax_setup(logits, axis, where, **options):
    """Checks the inputs as the losses do; returns (capped logits z [..., K] with masked classes
    at -inf, dz_capped/dz_raw, example mask or None, class mask or None (class axis last),
    normalised axis, :class:`SoftmaxOptions`)."""
    raw = v.as_logits(logits)
    axis = v.normalize_axis(axis, raw.ndim)
    class_mask, example_mask = split_where(where, raw.shape, axis)
    dtype = v.compute_dtype(raw.dtype)
    opts = softmax_options(num_classes=raw.shape[axis], dtype=dtype, **options)
    x = jnp.moveaxis(raw.astype(dtype), axis, -1)
    if class_mask is not None:
        class_mask = jnp.moveaxis(class_mask, axis, -1)
        # Before the cap: a masked NaN then never reaches the tanh or its derivative.
        x = jnp.where(class_mask, x, -jnp.inf)
    scale = 1.0 if opts.scale is None else opts.scale
    x = x * scale  # a temperature T scales the logits by 1 / T (and the cap with them)
    cap = opts.scaled_softcap
    if cap is None:
        z, dcap = x, jnp.full_like(x, scale)
    else:
        t = jnp.tanh(x / cap)
        z = jnp.where(x == -jnp.inf, x, cap * t)
        dcap = jnp.where(x == -jnp.inf, 0.0, (1 - t * t) * scale)
    return z, dcap, example_mask, class_mask, axis, opts


def _scalars(opts: SoftmaxOptions):
    """(label smoothing, z-loss) as numbers or arrays, 0 when off."""
    eps = 0.0 if opts.label_smoothing is None else opts.label_smoothing
    return eps, 0.0 if opts.z_loss is None else opts.z_loss


def _softmax_parts(z):
    """softmax p, lse, the available classes and whether the row has any."""
    available = z > -jnp.inf
    row_valid = jnp.any(available, axis=-1)
    zmax = jnp.max(jnp.where(available, z, 0.0), axis=-1, keepdims=True)
    e = jnp.where(available, jnp.exp(jnp.where(available, z, 0.0) - zmax), 0.0)
    s = jnp.sum(e, axis=-1, keepdims=True)
    p = e / s
    lse = jnp.log(s[..., 0]) + zmax[..., 0]
    return p, lse, available, row_valid


def _finish(grad_z, dcap, valid, denominator, reduction, axis):
    v.check_reduction(reduction)
    grad = jnp.where(valid[..., None], grad_z * dcap, 0.0)
    if reduction == "mean":
        # A mean over nothing (denominator exactly 0) is 0; any other denominator divides.
        nonzero = denominator != 0
        grad = jnp.where(nonzero, grad / jnp.where(nonzero, denominator, 1), 0.0)
    return jnp.moveaxis(grad, -1, axis)


def softmax_cross_entropy_grad(
    logits: ArrayLike,
    labels: ArrayLike,
    *,
    axis: int = -1,
    where: ArrayLike | None = None,
    label_smoothing: float = 0.0,
    class_weights: ArrayLike | None = None,
    z_loss: float = 0.0,
    logit_softcap: float | None = None,
    temperature: float = 1.0,
    reduction: str = "none",
) -> jax.Array:
    r"""Gradient of :func:`xent_jax.softmax_cross_entropy` with respect to the logits.

    .. math::
        \frac{\partial \ell}{\partial z} =
        p \sum_c w_c t_c - w \odot t + 2 \lambda_z \operatorname{lse}(z)\, p

    which is the familiar :math:`p - y` for one-hot labels and no options; soft-capping
    multiplies by :math:`1 - \tanh^2(z/s)`.

    Args:
      logits: as for the loss.
      labels: as for the loss.
      axis: as for the loss.
      where: as for the loss.
      label_smoothing: as for the loss.
      class_weights: as for the loss.
      z_loss: as for the loss.
      logit_softcap: as for the loss.
      temperature: as for the loss.
      reduction: as for the loss.

    Returns:
      An array of the logits' shape.

    Examples:
      >>> import jax.numpy as jnp
      >>> from xent_jax import analytic
      >>> analytic.softmax_cross_entropy_grad(jnp.array([[0.0, 0.0]]), jnp.array([[1.0, 0.0]]))
      Array([[-0.5,  0.5]], dtype=float32)
    """
    targets = v.as_float_array("labels", labels)
    v.check_same_shape("logits", jnp.asarray(logits), "labels", targets)
    z, dcap, example_mask, class_mask, axis, opts = _softmax_setup(
        logits,
        axis,
        where,
        reduction=reduction,
        label_smoothing=label_smoothing,
        class_weights=class_weights,
        z_loss=z_loss,
        logit_softcap=logit_softcap,
        temperature=temperature,
    )
    eps, z_coef = _scalars(opts)
    w = opts.class_weights
    p, lse, available, row_valid = _softmax_parts(z)
    t = jnp.moveaxis(targets.astype(z.dtype), axis, -1)
    if class_mask is not None:
        t = jnp.where(class_mask, t, 0.0)  # masked classes carry no target (as in the loss)
    if opts.smoothing:
        k = jnp.sum(available, axis=-1, keepdims=True)
        t = (1 - eps) * t + eps * jnp.where(available, 1.0 / k, 0.0)
    w = jnp.ones(z.shape[-1], z.dtype) if w is None else w
    wt = w.astype(z.dtype) * t
    grad_z = p * jnp.sum(wt, axis=-1, keepdims=True) - wt + 2 * z_coef * lse[..., None] * p
    valid = row_valid if example_mask is None else row_valid & example_mask
    return _finish(grad_z, dcap, valid, jnp.sum(valid), reduction, axis)


def softmax_cross_entropy_with_integer_labels_grad(
    logits: ArrayLike,
    labels: ArrayLike,
    *,
    axis: int = -1,
    where: ArrayLike | None = None,
    ignore_index: int | None = None,
    label_smoothing: float = 0.0,
    class_weights: ArrayLike | None = None,
    z_loss: float = 0.0,
    logit_softcap: float | None = None,
    temperature: float = 1.0,
    reduction: str = "none",
) -> jax.Array:
    r"""Gradient of :func:`xent_jax.softmax_cross_entropy_with_integer_labels`.

    .. math::
        \frac{\partial \ell}{\partial z} =
        p\Big[(1-\varepsilon) w_y + \tfrac{\varepsilon}{K}\textstyle\sum_c w_c
        + 2\lambda_z \operatorname{lse}(z)\Big] - (1-\varepsilon) w_y e_y
        - \tfrac{\varepsilon}{K} w

    :math:`p - e_y` without options. Rows of invalid labels are NaN, ignored rows 0.

    Args:
      logits: as for the loss.
      labels: as for the loss.
      axis: as for the loss.
      where: as for the loss.
      ignore_index: as for the loss.
      label_smoothing: as for the loss.
      class_weights: as for the loss.
      z_loss: as for the loss.
      logit_softcap: as for the loss.
      temperature: as for the loss.
      reduction: as for the loss.

    Returns:
      An array of the logits' shape.

    Examples:
      >>> import jax.numpy as jnp
      >>> from xent_jax import analytic
      >>> analytic.softmax_cross_entropy_with_integer_labels_grad(
      ...     jnp.array([[0.0, 0.0]]), jnp.array([1]))
      Array([[ 0.5, -0.5]], dtype=float32)
    """
    z, dcap, example_mask, _, axis, opts = _softmax_setup(
        logits,
        axis,
        where,
        reduction=reduction,
        ignore_index=ignore_index,
        label_smoothing=label_smoothing,
        class_weights=class_weights,
        z_loss=z_loss,
        logit_softcap=logit_softcap,
        temperature=temperature,
    )
    eps, z_coef = _scalars(opts)
    ignore_index, w = opts.ignore_index, opts.class_weights
    k = z.shape[-1]
    # The losses' checks of the labels (integer dtype, the batch shape); the rest is redone here.
    prepare_integer_labels(labels, batch_shape=z.shape[:-1], num_classes=k, ignore_index=None)
    p, lse, available, row_valid = _softmax_parts(z)
    labels = comparable_labels(v.as_integer_labels(labels))  # no wrap: uint8, 256 classes
    onehot = labels[..., None] == jnp.arange(k)
    w = jnp.ones(k, z.dtype) if w is None else w.astype(z.dtype)
    w_y = jnp.sum(jnp.where(onehot, w, 0.0), axis=-1)
    w_avail = jnp.where(available, w, 0.0)
    k_avail = jnp.sum(available, axis=-1, keepdims=True)
    coeff = (1 - eps) * w_y[..., None] + eps * jnp.sum(w_avail, -1, keepdims=True) / k_avail
    target = (1 - eps) * w_y[..., None] * onehot + eps * w_avail / k_avail
    grad_z = p * (coeff + 2 * z_coef * lse[..., None]) - target
    kept = jnp.ones(labels.shape, bool) if ignore_index is None else labels != ignore_index
    out_of_range = (labels < 0) | (labels >= k)
    grad_z = jnp.where((out_of_range & kept)[..., None], jnp.nan, grad_z)
    valid = row_valid & kept
    if example_mask is not None:
        valid = valid & example_mask
    denominator = jnp.sum(jnp.where(valid, w_y, 0.0))
    return _finish(grad_z, dcap, valid, denominator, reduction, axis)


def sigmoid_binary_cross_entropy_grad(
    logits: ArrayLike,
    labels: ArrayLike,
    *,
    pos_weight: ArrayLike | None = None,
    label_smoothing: float = 0.0,
    where: ArrayLike | None = None,
    reduction: str = "none",
) -> jax.Array:
    r"""Gradient of :func:`xent_jax.sigmoid_binary_cross_entropy`.

    .. math::
        \frac{\partial \ell}{\partial x} = \sigma(x)\,(w_+ y + 1 - y) - w_+ y

    which is :math:`\sigma(x) - y` without ``pos_weight``.

    Args:
      logits: as for the loss.
      labels: as for the loss.
      pos_weight: as for the loss.
      label_smoothing: as for the loss.
      where: as for the loss.
      reduction: as for the loss.

    Returns:
      An array of the logits' shape.

    Examples:
      >>> import jax.numpy as jnp
      >>> from xent_jax import analytic
      >>> analytic.sigmoid_binary_cross_entropy_grad(jnp.array([0.0]), jnp.array([1.0]))
      Array([-0.5], dtype=float32)
    """
    raw = v.as_float_array("logits", logits)
    x = raw.astype(v.compute_dtype(raw.dtype))
    labels = v.as_float_array("labels", labels)
    v.check_broadcastable("labels", labels, x.shape, "logits")
    v.check_label_smoothing(label_smoothing)
    y = jnp.broadcast_to(labels.astype(x.dtype), x.shape)
    y = (1 - label_smoothing) * y + label_smoothing / 2
    w = 1.0
    if pos_weight is not None:
        w = v.as_float_array("pos_weight", pos_weight)
        v.check_broadcastable("pos_weight", w, x.shape, "logits")
        w = w.astype(x.dtype)
    grad = jax.nn.sigmoid(x) * (w * y + 1 - y) - w * y
    where = v.as_mask("where", where)
    if where is not None:
        v.check_broadcastable("where", where, x.shape, "logits")
    mask = jnp.ones(x.shape, bool) if where is None else jnp.broadcast_to(where, x.shape)
    grad = jnp.where(mask, grad, 0.0)
    v.check_reduction(reduction)
    if reduction == "mean":
        count = jnp.sum(mask)
        grad = jnp.where(count > 0, grad / jnp.maximum(count, 1), 0.0)
    return grad


def softmax_cross_entropy_hessian(logits: ArrayLike, *, axis: int = -1) -> jax.Array:
    r"""Hessian of the softmax cross-entropy with respect to the logits, per example.

    .. math::  \nabla_z^2 \ell = \operatorname{diag}(p) - p p^\top

    It does not depend on the labels (for labels summing to 1) and is the same for dense and
    integer labels.

    Args:
      logits: ``[..., K, ...]`` logits with the class axis at ``axis``.
      axis: the class axis.

    Returns:
      ``[..., K, K]``: the batch shape (logits without ``axis``) followed by the class pair.

    Examples:
      >>> import jax.numpy as jnp
      >>> from xent_jax import analytic
      >>> analytic.softmax_cross_entropy_hessian(jnp.array([0.0, 0.0]))
      Array([[ 0.25, -0.25],
             [-0.25,  0.25]], dtype=float32)
    """
    z, *_ = _softmax_setup(logits, axis, None)
    p, _, _, _ = _softmax_parts(z)
    return jnp.einsum("...i,ij->...ij", p, jnp.eye(p.shape[-1], dtype=p.dtype)) - (
        p[..., :, None] * p[..., None, :]
    )
