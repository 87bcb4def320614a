"""Softmax cross-entropy from logits, with dense (soft) labels and with integer labels."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.typing import ArrayLike

from xent_jax import _validation as v
from xent_jax._labels import prepare_integer_labels
from xent_jax._logits import (
    available_classes,
    combine_masks,
    masked_logsumexp,
    prepare_logits,
    smooth_targets,
    smoothing_is_on,
)
from xent_jax._reduction import reduce_loss


def _validity(example_mask: jax.Array | None, row_valid: jax.Array) -> jax.Array:
    return row_valid if example_mask is None else example_mask & row_valid


def softmax_cross_entropy(
    logits: ArrayLike,
    labels: ArrayLike,
    *,
    axis: int = -1,
    where: ArrayLike | None = None,
    label_smoothing: float = 0.0,
    class_weights: ArrayLike | None = None,
    z_loss: float = 0.0,
    logit_softcap: float | None = None,
    reduction: v.Reduction = "none",
) -> jax.Array:
    r"""Softmax cross-entropy between logits and dense (one-hot or soft) labels.

    .. math::
        \ell = -\sum_c w_c\, t_c \log \operatorname{softmax}(z)_c
               + \lambda_z \big(\log \textstyle\sum_c e^{z_c}\big)^2,
        \qquad t = (1 - \varepsilon)\, y + \varepsilon / K

    where :math:`z` are the (optionally soft-capped) logits, :math:`K` counts the classes that
    are neither masked by ``where`` nor at ``-inf`` in that row, and :math:`w` are
    ``class_weights``. A class with zero target mass contributes exactly 0, even when its logit
    is ``-inf``; positive mass on a ``-inf`` logit costs ``+inf``.

    Args:
      logits: ``[..., K, ...]`` unnormalised scores, class axis ``axis``. float16 / bfloat16
        are computed in float32.
      labels: same shape as ``logits``: a distribution over classes per example (rows need not
        be normalised; no renormalisation is done).
      axis: the class axis (PyTorch's layout ``[N, K, ...]`` is ``axis=1``).
      where: boolean mask. With the logits' rank it masks classes (they leave the softmax and
        receive no smoothing mass); with a lower rank it broadcasts to the batch shape and masks
        whole examples (loss 0, gradient 0, left out of the mean).
      label_smoothing: :math:`\varepsilon \in [0, 1)`.
      class_weights: ``[K]`` weight per class (PyTorch ``weight`` for probability targets).
      z_loss: coefficient of the squared log-normaliser (PaLM's z-loss).
      logit_softcap: if set to :math:`s`, logits become :math:`s \tanh(z / s)` first.
      reduction: ``"none"`` (per example, shape of ``logits`` without ``axis``), ``"sum"``, or
        ``"mean"`` over valid examples (0.0 when there are none).

    Returns:
      The loss in float32 (float64 for float64 logits).

    Examples:
      >>> import jax.numpy as jnp
      >>> import xent_jax
      >>> logits = jnp.array([[2.0, 1.0, 0.1]])
      >>> labels = jnp.array([[1.0, 0.0, 0.0]])
      >>> xent_jax.softmax_cross_entropy(logits, labels)
      Array([0.41703], dtype=float32)
    """
    prepared = prepare_logits(logits, axis=axis, where=where, logit_softcap=logit_softcap)
    z = prepared.logits
    targets = v.as_float_array("labels", labels)
    v.check_same_shape("logits", jnp.asarray(logits), "labels", targets)
    v.check_label_smoothing(label_smoothing)
    v.check_nonnegative("z_loss", z_loss)
    targets = jnp.moveaxis(targets.astype(z.dtype), prepared.axis, -1)
    weights = v.check_class_weights(class_weights, z.shape[-1])

    lse, row_valid = masked_logsumexp(z)
    log_probs = z - lse[..., None]
    targets = smooth_targets(targets, z, label_smoothing)
    if weights is not None:
        targets = targets * weights.astype(z.dtype)
    # 0 * log 0 = 0: a class without target mass never contributes, even at a -inf logit.
    terms = jnp.where(targets == 0, 0, targets * log_probs)
    loss = -jnp.sum(terms, axis=-1)
    if z_loss:
        loss = loss + z_loss * jnp.square(lse)
    valid = _validity(prepared.example_mask, row_valid)
    loss = jnp.where(valid, loss, 0)
    return reduce_loss(loss, reduction, denominator_weights=valid)


def softmax_cross_entropy_with_integer_labels(
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
    reduction: v.Reduction = "none",
) -> jax.Array:
    r"""Softmax cross-entropy with integer class labels; never builds a one-hot.

    .. math::
        \ell = (1 - \varepsilon)\, w_y \big(\operatorname{lse}(z) - z_y\big)
               + \frac{\varepsilon}{K} \sum_c w_c \big(\operatorname{lse}(z) - z_c\big)
               + \lambda_z \operatorname{lse}(z)^2

    This is ``torch.nn.functional.cross_entropy`` with ``weight``, ``ignore_index`` and
    ``label_smoothing``: with ``reduction="mean"`` the sum is divided by the summed
    :math:`w_y` of the valid examples (0.0 when there are none, where PyTorch gives NaN).

    Labels outside ``[0, K)`` that are not ``ignore_index`` give NaN for that example (optax
    silently wraps ``-1`` to the last class). For a hard error instead, see
    :func:`xent_jax.validate_integer_labels` and :func:`xent_jax.checked`.

    Args:
      logits: ``[..., K, ...]`` unnormalised scores with the class axis at ``axis``; float16 /
        bfloat16 are computed in float32.
      labels: integer class indices with the shape of ``logits`` without ``axis``.
      axis: the class axis (PyTorch's ``[N, K, d1, ...]`` layout is ``axis=1``).
      where: boolean mask; with the logits' rank it masks classes, with a lower rank it masks
        examples (loss 0, gradient 0, left out of the mean).
      ignore_index: a label value that marks an example to ignore (like a ``where`` of False).
      label_smoothing: :math:`\varepsilon \in [0, 1)`, spread over the :math:`K` classes that are
        neither masked nor at ``-inf``.
      class_weights: ``[K]`` weight per class.
      z_loss: coefficient of the squared log-normaliser.
      logit_softcap: if set to :math:`s`, logits become :math:`s \tanh(z / s)` first.
      reduction: ``"none"`` (shape of ``labels``), ``"sum"`` or ``"mean"``.

    Returns:
      The loss in float32 (float64 for float64 logits).

    Examples:
      >>> import jax.numpy as jnp
      >>> import xent_jax
      >>> logits = jnp.array([[2.0, 1.0, 0.1], [0.5, 2.5, 0.0]])
      >>> xent_jax.softmax_cross_entropy_with_integer_labels(logits, jnp.array([0, 1]))
      Array([0.41703, 0.19673], dtype=float32)
      >>> xent_jax.softmax_cross_entropy_with_integer_labels(
      ...     logits, jnp.array([0, -100]), ignore_index=-100, reduction="mean")
      Array(0.41703, dtype=float32)
    """
    prepared = prepare_logits(logits, axis=axis, where=where, logit_softcap=logit_softcap)
    z = prepared.logits
    v.check_label_smoothing(label_smoothing)
    v.check_nonnegative("z_loss", z_loss)
    num_classes = z.shape[-1]
    weights = v.check_class_weights(class_weights, num_classes)
    labels = prepare_integer_labels(
        labels, batch_shape=z.shape[:-1], num_classes=num_classes, ignore_index=ignore_index
    )
    safe_labels = labels.safe

    lse, row_valid = masked_logsumexp(z)
    label_logits = jnp.take_along_axis(z, safe_labels[..., None], axis=-1)[..., 0]
    nll = lse - label_logits
    label_weights = None if weights is None else weights.astype(z.dtype)[safe_labels]
    if label_weights is not None:
        nll = nll * label_weights
    if smoothing_is_on(label_smoothing):
        available = available_classes(z)
        num_available = jnp.maximum(jnp.sum(available, axis=-1), 1)
        # lse - z_c summed over classes that can receive mass; -inf classes would give +inf.
        per_class = jnp.where(available, lse[..., None] - z, 0)
        if weights is not None:
            per_class = per_class * weights.astype(z.dtype)
        smooth = jnp.sum(per_class, axis=-1) / num_available
        loss = (1.0 - label_smoothing) * nll + label_smoothing * smooth
    else:
        loss = nll
    if z_loss:
        loss = loss + z_loss * jnp.square(lse)

    valid = combine_masks(prepared.example_mask, row_valid, labels.kept)
    # Loud, never silently wrong: an invalid label (not ignored) makes its example NaN.
    loss = jnp.where(labels.invalid, jnp.nan, loss)
    loss = jnp.where(valid, loss, 0)
    denominator = valid if label_weights is None else jnp.where(valid, label_weights, 0)
    return reduce_loss(loss, reduction, denominator_weights=denominator)
