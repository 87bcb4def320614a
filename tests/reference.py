"""Float64 NumPy reference implementations of every xent_jax loss, written from the formulas.

Nothing here imports jax: each function is a direct, unoptimised transcription of the math in the
API contract, computed in float64, so the tests can compare the library against something that
shares none of its code. Other test modules import these functions; their names mirror the public
API of ``xent_jax`` and their keyword arguments have the same meaning and defaults.

Conventions shared by all references:

* ``0 * log 0 = 0``: a term whose coefficient (probability or target) is exactly zero contributes
  exactly zero, even when the log is ``-inf``. A positive coefficient on a ``-inf`` log gives
  ``+inf``.
* ``where`` for the softmax losses: ``where.ndim == logits.ndim`` is a class mask broadcast to
  ``logits.shape``; a lower rank is an example mask broadcast to the batch shape (``logits.shape``
  without ``axis``). Masked examples cost 0 and leave the mean. For elementwise losses ``where``
  masks elements.
* A row whose unmasked logits are all ``-inf`` (or whose classes are all masked) costs 0 and is
  left out of the mean.
* ``reduction="mean"`` divides the summed loss by the summed per-example weights returned by each
  reference (see :func:`reduce_loss`); a mean over nothing is ``0.0``.
"""

from __future__ import annotations

import numpy as np

__all__ = [
    "binary_cross_entropy",
    "binary_entropy",
    "categorical_cross_entropy",
    "cross_entropy",
    "entropy",
    "js_divergence",
    "kl_divergence",
    "log_sigmoid",
    "masked_log_softmax",
    "poly_loss_cross_entropy",
    "reduce_loss",
    "sigmoid_binary_cross_entropy",
    "sigmoid_focal_loss",
    "softcap",
    "softmax_cross_entropy",
    "softmax_cross_entropy_with_integer_labels",
    "softmax_focal_loss",
    "softmax_focal_loss_with_integer_labels",
    "sparse_categorical_cross_entropy",
]


def _f64(x) -> np.ndarray:
    return np.asarray(x, dtype=np.float64)


def _log_scale(base) -> float:
    """Divisor that turns nats into units of ``base`` (1 for nats)."""
    return 1.0 if base is None else float(np.log(base))


def _xlogy(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """``x * log(y)`` with ``0 * log(anything) = 0``; ``x > 0, y = 0`` gives ``-inf``."""
    x, y = np.broadcast_arrays(_f64(x), _f64(y))
    out = np.zeros(x.shape)
    nonzero = x != 0  # NaN coefficients fall in here and propagate.
    with np.errstate(divide="ignore", invalid="ignore"):
        out[nonzero] = x[nonzero] * np.log(y[nonzero])
    return out


def reduce_loss(values, weights, reduction: str):
    """Applies ``reduction`` to per-example ``values``.

    Args:
      values: per-example (or per-element) losses, already zero where invalid.
      weights: same shape; the mean's denominator is ``weights.sum()`` (the count of valid
        examples, or the summed class weights of the valid examples for integer labels).
      reduction: ``"none"`` returns ``values``; ``"sum"`` their sum; ``"mean"`` the sum divided by
        ``weights.sum()``, or ``0.0`` when that is zero.
    """
    values = _f64(values)
    if reduction == "none":
        return values
    if reduction == "sum":
        return np.float64(values.sum())
    if reduction == "mean":
        denominator = float(_f64(weights).sum())
        return np.float64(values.sum() / denominator) if denominator != 0 else np.float64(0.0)
    raise ValueError(f"unknown reduction {reduction!r}")


# --------------------------------------------------------------------------------------------
# Information theory on probability vectors (no renormalisation).
# --------------------------------------------------------------------------------------------


def _masked_sum(terms: np.ndarray, axis: int, where) -> np.ndarray:
    if where is not None:
        terms = np.where(np.broadcast_to(np.asarray(where, bool), terms.shape), terms, 0.0)
    return terms.sum(axis=axis)


def entropy(p, *, axis=-1, base=None, where=None):
    """Shannon entropy ``H(p) = -sum_i p_i log p_i`` along ``axis``, with ``0 log 0 = 0``.

    ``p`` is used as given (not renormalised). ``base=2`` gives bits. Entries where ``where`` is
    False leave the sum.
    """
    p = _f64(p)
    return -_masked_sum(_xlogy(p, p), axis, where) / _log_scale(base)


def cross_entropy(p, q, *, axis=-1, base=None, where=None):
    """Cross-entropy ``H(p, q) = -sum_i p_i log q_i``; ``p_i = 0`` terms are 0, ``p_i > 0 = q_i``
    gives ``+inf``. Inputs are not renormalised."""
    return -_masked_sum(_xlogy(p, q), axis, where) / _log_scale(base)


def kl_divergence(p, q, *, axis=-1, base=None, where=None):
    """Kullback-Leibler divergence ``KL(p || q) = sum_i p_i (log p_i - log q_i)``.

    Terms with ``p_i = 0`` are 0; ``p_i > 0`` with ``q_i = 0`` gives ``+inf``.
    """
    p, q = np.broadcast_arrays(_f64(p), _f64(q))
    terms = np.zeros(p.shape)
    nonzero = p != 0
    with np.errstate(divide="ignore", invalid="ignore"):
        terms[nonzero] = p[nonzero] * (np.log(p[nonzero]) - np.log(q[nonzero]))
    return _masked_sum(terms, axis, where) / _log_scale(base)


def js_divergence(p, q, *, axis=-1, base=None, where=None):
    """Jensen-Shannon divergence ``(KL(p || m) + KL(q || m)) / 2`` with ``m = (p + q) / 2``.

    In nats it lies in ``[0, log 2]`` for probability vectors.
    """
    p, q = np.broadcast_arrays(_f64(p), _f64(q))
    m = 0.5 * (p + q)
    return 0.5 * (
        kl_divergence(p, m, axis=axis, base=base, where=where)
        + kl_divergence(q, m, axis=axis, base=base, where=where)
    )


def binary_entropy(p, *, base=None):
    """Elementwise ``-p log p - (1 - p) log(1 - p)`` with ``0 log 0 = 0``."""
    p = _f64(p)
    return -(_xlogy(p, p) + _xlogy(1.0 - p, 1.0 - p)) / _log_scale(base)


# --------------------------------------------------------------------------------------------
# Softmax losses from logits.
# --------------------------------------------------------------------------------------------


def softcap(logits, cap):
    """``cap * tanh(logits / cap)``; ``cap=None`` returns the logits unchanged."""
    logits = _f64(logits)
    return logits if cap is None else cap * np.tanh(logits / cap)


def masked_log_softmax(logits, class_mask=None):
    """Log-softmax over the LAST axis restricted to the classes where ``class_mask`` is True.

    Returns ``(log_probs, lse, row_valid)``: ``log_probs`` is ``-inf`` on masked classes,
    ``lse`` is the log-sum-exp over unmasked classes, and ``row_valid`` is False for rows whose
    unmasked logits are all ``-inf`` (or that have no unmasked class). A NaN logit keeps its row
    valid so that the NaN propagates to that row's loss.
    """
    z = _f64(logits)
    mask = np.ones(z.shape, bool) if class_mask is None else np.broadcast_to(class_mask, z.shape)
    zm = np.where(mask, z, -np.inf)
    row_valid = ~np.all(zm == -np.inf, axis=-1)
    shift = np.max(zm, axis=-1, keepdims=True)
    shift = np.where(np.isfinite(shift) | np.isnan(shift), shift, 0.0)
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        lse = shift[..., 0] + np.log(np.sum(np.exp(zm - shift), axis=-1))
        log_probs = zm - lse[..., None]
    return log_probs, lse, row_valid


def _split_where(where, shape, axis):
    """Splits ``where`` into (class mask with classes last, example mask of the batch shape)."""
    ndim = len(shape)
    batch_shape = tuple(s for i, s in enumerate(shape) if i != axis % ndim)
    all_classes = np.ones((*batch_shape, shape[axis]), bool)
    if where is None:
        return all_classes, np.ones(batch_shape, bool)
    where = np.asarray(where, bool)
    if where.ndim == ndim:
        return np.moveaxis(np.broadcast_to(where, shape), axis, -1), np.ones(batch_shape, bool)
    return all_classes, np.broadcast_to(where, batch_shape)


def _class_weights(class_weights, num_classes):
    if class_weights is None:
        return np.ones(num_classes)
    return _f64(class_weights)


def _weighted_t_logp(target, weights, log_probs):
    """``w_c t_c log p_c`` with zero-target terms exactly zero (even when ``log p_c = -inf``)."""
    out = np.zeros(np.broadcast_shapes(target.shape, log_probs.shape))
    target, weights, log_probs = np.broadcast_arrays(target, weights, log_probs)
    nonzero = target != 0
    out[nonzero] = weights[nonzero] * target[nonzero] * log_probs[nonzero]
    return out


def softmax_cross_entropy(
    logits,
    labels,
    *,
    axis=-1,
    where=None,
    label_smoothing=0.0,
    class_weights=None,
    z_loss=0.0,
    logit_softcap=None,
    reduction="none",
):
    """Dense-label softmax cross-entropy (PyTorch probability-target semantics).

    ``z <- softcap(z)``; ``p = softmax(z)`` over unmasked classes; the target is
    ``t = (1 - eps) y + eps / K`` with the ``eps / K`` spread only on the ``K`` unmasked classes of
    each row; ``loss = -sum_c w_c t_c log p_c + z_loss * lse(z)^2``. ``reduction="mean"`` divides
    by the number of valid examples.
    """
    shape = np.shape(logits)
    z = softcap(np.moveaxis(_f64(logits), axis, -1), logit_softcap)
    y = np.moveaxis(np.broadcast_to(_f64(labels), shape), axis, -1)
    class_mask, example_mask = _split_where(where, shape, axis)
    log_probs, lse, row_valid = masked_log_softmax(z, class_mask)
    num_unmasked = class_mask.sum(axis=-1, keepdims=True)
    eps = float(label_smoothing)
    with np.errstate(divide="ignore", invalid="ignore"):
        smooth = np.where(class_mask, eps / num_unmasked, 0.0)
    target = (1.0 - eps) * y + smooth
    weights = _class_weights(class_weights, z.shape[-1])
    loss = -_weighted_t_logp(target, weights, log_probs).sum(-1)
    if z_loss:
        loss = loss + z_loss * lse**2
    valid = example_mask & row_valid
    loss = np.where(valid, loss, 0.0)
    return reduce_loss(loss, valid.astype(np.float64), reduction)


def softmax_cross_entropy_with_integer_labels(
    logits,
    labels,
    *,
    axis=-1,
    where=None,
    ignore_index=None,
    label_smoothing=0.0,
    class_weights=None,
    z_loss=0.0,
    logit_softcap=None,
    reduction="none",
):
    """Integer-label softmax cross-entropy with ``torch.nn.functional.cross_entropy`` semantics.

    ``loss_i = (1 - eps) w[y] (lse - z_y) + (eps / K) sum_c w_c (lse - z_c) + z_loss lse^2`` with
    the sum over the ``K`` unmasked classes. Labels equal to ``ignore_index`` cost 0; labels out of
    ``[0, K)`` give NaN. ``reduction="mean"`` divides by the summed ``w[y_i]`` over valid examples.
    """
    shape = np.shape(logits)
    z = softcap(np.moveaxis(_f64(logits), axis, -1), logit_softcap)
    labels = np.asarray(labels).astype(np.int64)
    num_classes = z.shape[-1]
    class_mask, example_mask = _split_where(where, shape, axis)
    log_probs, lse, row_valid = masked_log_softmax(z, class_mask)
    weights = _class_weights(class_weights, num_classes)
    in_range = (labels >= 0) & (labels < num_classes)
    safe = np.where(in_range, labels, 0)
    log_p_label = np.take_along_axis(log_probs, safe[..., None], axis=-1)[..., 0]
    w_label = weights[safe]
    eps = float(label_smoothing)
    loss = -(1.0 - eps) * w_label * log_p_label
    if eps:
        num_unmasked = class_mask.sum(axis=-1)
        with np.errstate(invalid="ignore"):
            smooth = -np.where(class_mask, weights * log_probs, 0.0).sum(-1)
        loss = loss + eps / num_unmasked * smooth
    if z_loss:
        loss = loss + z_loss * lse**2
    loss = np.where(in_range, loss, np.nan)
    ignored = np.zeros(labels.shape, bool) if ignore_index is None else labels == ignore_index
    valid = example_mask & row_valid & ~ignored
    loss = np.where(valid, loss, 0.0)
    return reduce_loss(loss, np.where(valid, w_label, 0.0), reduction)


# --------------------------------------------------------------------------------------------
# Sigmoid (elementwise) losses from logits.
# --------------------------------------------------------------------------------------------


def log_sigmoid(x):
    """Stable ``log(sigmoid(x)) = -log(1 + exp(-x))``."""
    return -np.logaddexp(0.0, -_f64(x))


def _sigmoid(x):
    return np.exp(log_sigmoid(x))


def _element_mask(where, shape):
    if where is None:
        return np.ones(shape, bool)
    return np.broadcast_to(np.asarray(where, bool), shape)


def sigmoid_binary_cross_entropy(
    logits, labels, *, pos_weight=None, label_smoothing=0.0, where=None, reduction="none"
):
    """Elementwise ``-[pw y log sigmoid(x) + (1 - y) log sigmoid(-x)]`` after
    ``y <- y (1 - eps) + eps / 2`` (``torch.nn.BCEWithLogitsLoss(pos_weight=pw)``).
    ``reduction="mean"`` divides by the number of unmasked elements."""
    x = _f64(logits)
    y = np.broadcast_to(_f64(labels), x.shape)
    eps = float(label_smoothing)
    y = y * (1.0 - eps) + eps / 2.0
    pw = 1.0 if pos_weight is None else _f64(pos_weight)
    loss = -(pw * y * log_sigmoid(x) + (1.0 - y) * log_sigmoid(-x))
    mask = _element_mask(where, x.shape)
    loss = np.where(mask, loss, 0.0)
    return reduce_loss(loss, mask.astype(np.float64), reduction)


def sigmoid_focal_loss(logits, labels, *, alpha=None, gamma=2.0, where=None, reduction="none"):
    """Sigmoid focal loss (Lin et al., optax's formula): ``alpha_t * ce * (1 - p_t)^gamma`` with
    ``p_t = p y + (1 - p)(1 - y)`` and ``alpha_t = alpha y + (1 - alpha)(1 - y)`` (omitted when
    ``alpha`` is None). ``1 - p_t`` is evaluated as ``y sigmoid(-x) + (1 - y) sigmoid(x)``."""
    x = _f64(logits)
    y = np.broadcast_to(_f64(labels), x.shape)
    ce = -(y * log_sigmoid(x) + (1.0 - y) * log_sigmoid(-x))
    one_minus_pt = y * _sigmoid(-x) + (1.0 - y) * _sigmoid(x)
    loss = ce * one_minus_pt**gamma
    if alpha is not None:
        loss = (alpha * y + (1.0 - alpha) * (1.0 - y)) * loss
    mask = _element_mask(where, x.shape)
    loss = np.where(mask, loss, 0.0)
    return reduce_loss(loss, mask.astype(np.float64), reduction)


# --------------------------------------------------------------------------------------------
# Focal and poly losses over softmax.
# --------------------------------------------------------------------------------------------


def _alpha_vector(alpha, num_classes):
    if alpha is None:
        return np.ones(num_classes)
    return np.broadcast_to(_f64(alpha), (num_classes,))


def softmax_focal_loss(
    logits, labels, *, axis=-1, alpha=None, gamma=2.0, where=None, reduction="none"
):
    """Dense-label softmax focal loss ``-sum_c alpha_c y_c (1 - p_c)^gamma log p_c``.

    ``alpha`` is None (1), a scalar, or a per-class vector. ``1 - p_c`` is ``-expm1(log p_c)``.
    ``reduction="mean"`` divides by the number of valid examples.
    """
    shape = np.shape(logits)
    z = np.moveaxis(_f64(logits), axis, -1)
    y = np.moveaxis(np.broadcast_to(_f64(labels), shape), axis, -1)
    class_mask, example_mask = _split_where(where, shape, axis)
    log_probs, _, row_valid = masked_log_softmax(z, class_mask)
    alphas = _alpha_vector(alpha, z.shape[-1])
    modulator = (-np.expm1(log_probs)) ** gamma
    loss = -_weighted_t_logp(y, alphas * modulator, log_probs).sum(-1)
    valid = example_mask & row_valid
    loss = np.where(valid, loss, 0.0)
    return reduce_loss(loss, valid.astype(np.float64), reduction)


def softmax_focal_loss_with_integer_labels(
    logits,
    labels,
    *,
    axis=-1,
    alpha=None,
    gamma=2.0,
    where=None,
    ignore_index=None,
    reduction="none",
):
    """Integer-label softmax focal loss ``-alpha_y (1 - p_y)^gamma log p_y``; ``ignore_index``
    costs 0, labels out of range give NaN; the mean divides by the number of valid examples."""
    shape = np.shape(logits)
    z = np.moveaxis(_f64(logits), axis, -1)
    labels = np.asarray(labels).astype(np.int64)
    num_classes = z.shape[-1]
    class_mask, example_mask = _split_where(where, shape, axis)
    log_probs, _, row_valid = masked_log_softmax(z, class_mask)
    alphas = _alpha_vector(alpha, num_classes)
    in_range = (labels >= 0) & (labels < num_classes)
    safe = np.where(in_range, labels, 0)
    log_p = np.take_along_axis(log_probs, safe[..., None], axis=-1)[..., 0]
    loss = -alphas[safe] * (-np.expm1(log_p)) ** gamma * log_p
    loss = np.where(in_range, loss, np.nan)
    ignored = np.zeros(labels.shape, bool) if ignore_index is None else labels == ignore_index
    valid = example_mask & row_valid & ~ignored
    loss = np.where(valid, loss, 0.0)
    return reduce_loss(loss, valid.astype(np.float64), reduction)


def poly_loss_cross_entropy(
    logits, labels, *, epsilon=2.0, axis=-1, where=None, label_smoothing=0.0, reduction="none"
):
    """Poly-1 loss ``CE(t) + epsilon (1 - sum_c t_c p_c)`` with the smoothed target ``t`` of
    :func:`softmax_cross_entropy` (labels assumed normalised). Mean over valid examples."""
    shape = np.shape(logits)
    z = np.moveaxis(_f64(logits), axis, -1)
    y = np.moveaxis(np.broadcast_to(_f64(labels), shape), axis, -1)
    class_mask, example_mask = _split_where(where, shape, axis)
    log_probs, _, row_valid = masked_log_softmax(z, class_mask)
    eps = float(label_smoothing)
    num_unmasked = class_mask.sum(axis=-1, keepdims=True)
    with np.errstate(divide="ignore", invalid="ignore"):
        target = (1.0 - eps) * y + np.where(class_mask, eps / num_unmasked, 0.0)
    ce = -_weighted_t_logp(target, np.ones(1), log_probs).sum(-1)
    loss = ce + epsilon * (1.0 - (target * np.exp(log_probs)).sum(-1))
    valid = example_mask & row_valid
    loss = np.where(valid, loss, 0.0)
    return reduce_loss(loss, valid.astype(np.float64), reduction)


# --------------------------------------------------------------------------------------------
# Keras-style losses from probabilities (from_logits=False).
# --------------------------------------------------------------------------------------------


def binary_cross_entropy(
    probs, labels, *, eps=1e-7, label_smoothing=0.0, where=None, reduction="none"
):
    """Keras ``binary_crossentropy`` elementwise: ``y <- y (1 - ls) + ls / 2``,
    ``p <- clip(p, eps, 1 - eps)``, ``loss = -(y log p + (1 - y) log(1 - p))``.

    Keras's per-row value is ``reduction="mean"`` over the last axis of this.
    """
    p = np.clip(_f64(probs), eps, 1.0 - eps)
    y = np.broadcast_to(_f64(labels), p.shape)
    ls = float(label_smoothing)
    y = y * (1.0 - ls) + 0.5 * ls
    loss = -(y * np.log(p) + (1.0 - y) * np.log(1.0 - p))
    mask = _element_mask(where, p.shape)
    loss = np.where(mask, loss, 0.0)
    return reduce_loss(loss, mask.astype(np.float64), reduction)


def categorical_cross_entropy(
    probs, labels, *, axis=-1, eps=1e-7, label_smoothing=0.0, where=None, reduction="none"
):
    """Keras ``categorical_crossentropy``: ``p <- p / sum(p)`` along ``axis``, then
    ``clip(p, eps, 1 - eps)``; ``y <- y (1 - ls) + ls / K``; ``loss = -sum_c y_c log p_c``.

    A class mask (``where`` of the probabilities' rank) drops the masked classes from the
    renormalisation, the sum and ``K``; a lower-rank ``where`` masks examples.
    """
    shape = np.shape(probs)
    p = np.moveaxis(_f64(probs), axis, -1)
    y = np.moveaxis(np.broadcast_to(_f64(labels), shape), axis, -1)
    class_mask, example_mask = _split_where(where, shape, axis)
    p = np.where(class_mask, p, 0.0)
    p = np.clip(p / p.sum(axis=-1, keepdims=True), eps, 1.0 - eps)
    ls = float(label_smoothing)
    num_unmasked = class_mask.sum(axis=-1, keepdims=True)
    y = y * (1.0 - ls) + ls / num_unmasked
    loss = -np.where(class_mask, y * np.log(p), 0.0).sum(-1)
    loss = np.where(example_mask, loss, 0.0)
    return reduce_loss(loss, example_mask.astype(np.float64), reduction)


def sparse_categorical_cross_entropy(
    probs, labels, *, axis=-1, eps=1e-7, ignore_index=None, where=None, reduction="none"
):
    """Keras ``sparse_categorical_crossentropy``: renormalise along ``axis``, clip to
    ``[eps, 1 - eps]``, ``loss = -log p_y``. ``ignore_index`` costs 0 and leaves the mean (over
    valid examples); an out-of-range label gives NaN."""
    shape = np.shape(probs)
    p = np.moveaxis(_f64(probs), axis, -1)
    labels = np.asarray(labels).astype(np.int64)
    class_mask, example_mask = _split_where(where, shape, axis)
    p = np.where(class_mask, p, 0.0)
    p = np.clip(p / p.sum(axis=-1, keepdims=True), eps, 1.0 - eps)
    num_classes = p.shape[-1]
    in_range = (labels >= 0) & (labels < num_classes)
    safe = np.where(in_range, labels, 0)
    loss = -np.log(np.take_along_axis(p, safe[..., None], axis=-1)[..., 0])
    loss = np.where(in_range, loss, np.nan)
    ignored = np.zeros(labels.shape, bool) if ignore_index is None else labels == ignore_index
    valid = example_mask & ~ignored
    loss = np.where(valid, loss, 0.0)
    return reduce_loss(loss, valid.astype(np.float64), reduction)
