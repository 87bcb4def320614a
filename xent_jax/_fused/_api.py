"""The public fused loss: argument checks, the block plan of a call, and the choice between
the strip and the tiles schedule (see the package docstring)."""

from __future__ import annotations

import dataclasses
import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.typing import ArrayLike

from xent_jax import _validation as v
from xent_jax._fused._blocks import (
    Plan,
    default_blocks,
    pad_class_mask,
    split_axis,
    split_where_blocked,
)
from xent_jax._fused._custom_vjp import reduced_loss, rows_loss
from xent_jax._fused._local import Call, nondiff_inputs, safe_divide
from xent_jax._mesh import local_sizes, resolve_layout, vocab_padding
from xent_jax._options import softmax_options
from xent_jax._reduction import reduce_loss


class LinearCrossEntropyAux(NamedTuple):
    r"""Extra per-token outputs of the fused loss, computed in the same pass as the loss.

    All are taken at the loss's temperature, of the soft-capped, masked logits. ``logsumexp``
    and ``label_logprob`` are differentiable (their gradients join the loss's in the same
    backward pass; a z-loss variant or an RL objective can use them); the others carry no
    gradient.

    Attributes:
      logsumexp: ``[...]`` log-normaliser of each token's logits; 0 for tokens that do not
        count (masked by ``where``, ignored, or with every class masked).
      entropy: ``[...]`` entropy (nats) of each token's predicted distribution; 0 for tokens
        masked by ``where`` or ignored. No gradient (``lax.stop_gradient``).
      label_logprob: ``[...]`` :math:`\log p_y` of the label; 0 for tokens that do not count,
        NaN for an invalid label.
      argmax: ``[...]`` int32 index of each token's largest logit (first one on ties).
      accuracy: scalar, the fraction of valid tokens (not masked by ``where``, not
        ``ignore_index``; weighted by float ``where`` weights) whose argmax equals the label;
        0 when there are none.
      weight_sum: scalar, what ``reduction="mean"`` divides the summed loss by (the summed
        label class weights and token weights of the valid tokens: their number without
        either). With ``reduction="sum"`` it gives an exact mean over micro-batches or data
        shards: ``sum of losses / sum of weight_sum``.
    """

    logsumexp: jax.Array
    entropy: jax.Array
    label_logprob: jax.Array
    argmax: jax.Array
    accuracy: jax.Array
    weight_sum: jax.Array


def _check_precision(precision) -> jax.lax.Precision | None:
    """``None``, a ``jax.lax.Precision`` or its name (``"highest"``, ``"float32"``, ...)."""
    if precision is None or isinstance(precision, jax.lax.Precision):
        return precision
    if isinstance(precision, str):
        try:
            return jax.lax.Precision(precision)
        except ValueError:
            pass
    raise ValueError(
        "precision must be None, a jax.lax.Precision or one of 'default', 'high', 'highest' "
        f"(or 'bfloat16', 'tensorfloat32', 'float32'), got {precision!r}."
    )


def _check_block(name: str, value: int | None) -> None:
    """Refuses a block size that is neither ``None`` nor a positive integer."""
    if value is not None and (not isinstance(value, int | np.integer) or value < 1):
        raise ValueError(f"{name} must be a positive integer or None, got {value!r}.")


def linear_softmax_cross_entropy_with_integer_labels(
    x: ArrayLike,
    w: ArrayLike,
    labels: ArrayLike,
    *,
    bias: ArrayLike | None = None,
    where: ArrayLike | None = None,
    ignore_index: int | None = None,
    label_smoothing: float = 0.0,
    class_weights: ArrayLike | None = None,
    z_loss: float = 0.0,
    logit_softcap: float | None = None,
    temperature: float = 1.0,
    reduction: v.Reduction = "none",
    normalizer: ArrayLike | None = None,
    shift: bool = False,
    return_aux: bool = False,
    precision: str | jax.lax.Precision | None = None,
    block_size_tokens: int | None = None,
    block_size_vocab: int | None = None,
    mesh: Any = None,
    vocab_axis: str | tuple[str, ...] | None = None,
    batch_axis: str | tuple[str, ...] | None = None,
) -> jax.Array | tuple[jax.Array, LinearCrossEntropyAux]:
    r"""Softmax cross-entropy of the logits ``x @ w + bias``, without materialising them.

    Gives the same numbers (and gradients for ``x``, ``w`` and ``bias``) as
    ``softmax_cross_entropy_with_integer_labels(x @ w + bias, labels, ...)`` with the same
    options, while holding only one ``[block_size_tokens, block_size_vocab]`` block of logits at
    a time:

    .. math::
        z = \operatorname{softcap}(x W + b), \qquad
        \ell = (1 - \varepsilon)\, w_y \big(\operatorname{lse}(z) - z_y\big)
               + \frac{\varepsilon}{K} \sum_c w_c \big(\operatorname{lse}(z) - z_c\big)
               + \lambda_z \operatorname{lse}(z)^2

    with :math:`\operatorname{lse}(z) = \log \sum_c e^{z_c}` accumulated online over vocabulary
    tiles. The backward pass recomputes each block of logits from ``x`` and ``w`` (a custom
    VJP); with ``reduction="sum"`` / ``"mean"`` and the whole vocabulary in one tile (the
    default up to 65536 classes) the gradients are formed in the same pass as the loss, so the
    cost is that of the materialised loss, ``6 N D V`` FLOPs, instead of ``8 N D V``.

    Arrays sharded with a ``NamedSharding`` work under plain ``jax.jit``: ``w`` split along
    ``V`` (vocab-parallel) and/or ``x`` / ``labels`` split along tokens (data-parallel) give the
    single-device values and gradients, and no device ever holds more than its own block of
    logits; a vocabulary the mesh does not divide is padded inside the loss.

    Args:
      x: ``[..., D]`` inputs (hidden states), any float dtype; bfloat16 / float16 are multiplied
        with float32 accumulation and the loss is computed in float32.
      w: ``[D, V]`` output projection.
      labels: ``[...]`` integer labels (the shape of ``x`` without its last axis).
      bias: optional ``[V]`` bias; ``-inf`` entries mask classes.
      where: boolean mask, or per-token float weights. A boolean mask with the rank of the
        logits (``[..., V]``, e.g. ``mask[None, :]`` for all tokens) masks classes; with a lower
        rank it broadcasts to the batch shape and masks tokens (loss 0, gradient 0, left out of
        the mean). A class mask that differs per token costs ``N x V`` booleans. Floats (batch
        rank at most) weigh each token's loss and gradient; the mean divides by their sum
        (times the label class weights); a weight of 0 leaves the token out. Weights get no
        gradient (differentiating them raises).
      ignore_index: label value of tokens to ignore (e.g. ``-100``).
      label_smoothing: :math:`\varepsilon \in [0, 1)`, spread over the available classes.
      class_weights: ``[V]`` weight per class (treated as a constant: no gradient).
      z_loss: coefficient :math:`\lambda_z` of the squared log-normaliser.
      logit_softcap: if set to :math:`s > 0`, logits become :math:`s \tanh(z / s)` first.
      temperature: :math:`T > 0`: the softmax sees the (soft-capped) logits divided by
        :math:`T` (distillation, RL); the aux outputs are at that temperature too.
      reduction: ``"none"`` (per token, shape ``[...]``), ``"sum"``, or ``"mean"`` (divided by
        the summed :math:`w_y` of the valid tokens; 0.0 when there are none).
      normalizer: with ``reduction="mean"``, divide the summed loss by this scalar instead of
        by the local count: pass the global number of target tokens (or their summed weights)
        so that micro-batches of different lengths, or data shards of which some are fully
        padded, give exactly the one-big-batch mean and gradient. May be traced; 0 gives 0.
      shift: causal language modelling: pass ``x[..., T, D]`` and the tokens ``labels[..., T]``
        themselves; position ``t`` is scored on token ``t + 1`` and the last position has no
        target (loss 0, left out of the mean). A token ``where`` (or weights) refers to the
        tokens, like ``labels``, and moves with them.
      return_aux: also return a :class:`LinearCrossEntropyAux` (per-token logsumexp, entropy,
        label log-probability and argmax, the accuracy and the mean's denominator), computed in
        the same pass as the loss.
      precision: precision of the matrix products (``x @ w`` and the two gradient products),
        as in ``jnp.dot``: ``None`` follows ``jax.default_matmul_precision`` like a plain
        ``x @ w`` does. On GPUs and TPUs that default multiplies float32 inputs in reduced
        precision (TF32 / bfloat16 passes, relative errors ~1e-4); pass ``"highest"`` for full
        float32 products. No effect on CPU.
      block_size_tokens: at most this many tokens per block (default: as many as keep a block
        at 4M logits, up to 8192).
      block_size_vocab: at most this many classes per tile (default: the whole vocabulary up to
        65536 classes with ``reduction`` ``"sum"`` / ``"mean"``, else a 4M-logit block).
      mesh: optional mesh to ``shard_map`` over, with ``vocab_axis`` (the mesh axes ``w``'s
        classes are split over) and ``batch_axis`` (the mesh axes the first batch dimension is
        split over). Not needed when the arrays carry explicit shardings.
      vocab_axis: see ``mesh``.
      batch_axis: see ``mesh``.

    Returns:
      The loss (float32; float64 for float64 inputs), or ``(loss, aux)`` with ``return_aux``.

    Examples:
      >>> import jax, jax.numpy as jnp
      >>> import xent_jax
      >>> x = jnp.array([[1.0, 0.5], [0.0, -1.0], [2.0, 1.0]])
      >>> w = jnp.array([[1.0, 0.0, -1.0], [0.5, 2.0, 0.0]])
      >>> labels = jnp.array([0, 1, 2])
      >>> xent_jax.linear_softmax_cross_entropy_with_integer_labels(x, w, labels)
      Array([0.6335, 2.555 , 4.981 ], dtype=float32)
      >>> xent_jax.softmax_cross_entropy_with_integer_labels(x @ w, labels)
      Array([0.6335, 2.555 , 4.981 ], dtype=float32)
      >>> loss, aux = xent_jax.linear_softmax_cross_entropy_with_integer_labels(
      ...     x, w, labels, reduction="mean", return_aux=True, block_size_tokens=2)
      >>> loss, aux.argmax, aux.accuracy
      (Array(2.7231, dtype=float32), Array([0, 2, 0], dtype=int32), Array(0.33333, dtype=float32))
      >>> jax.grad(xent_jax.linear_softmax_cross_entropy_with_integer_labels, argnums=1)(
      ...     x, w, labels, reduction="mean").shape
      (2, 3)
    """
    x = v.as_float_array("x", x)
    w = v.as_float_array("w", w)
    if x.ndim < 1:
        raise ValueError(f"x must have at least one dimension (features), got shape {x.shape}.")
    if w.ndim != 2 or w.shape[0] != x.shape[-1]:
        raise ValueError(
            f"w must have shape [D, V] with D = x.shape[-1] = {x.shape[-1]}, got w.shape="
            f"{w.shape} (x.shape={x.shape})."
        )
    batch_shape, num_classes = x.shape[:-1], w.shape[1]
    cdtype = v.compute_dtype(x.dtype, w.dtype)
    if normalizer is not None and reduction != "mean":
        raise ValueError(
            f"normalizer= replaces the mean's denominator: it needs reduction='mean', got "
            f"reduction={reduction!r}."
        )
    options = softmax_options(
        num_classes=num_classes,
        dtype=cdtype,
        reduction=reduction,
        ignore_index=ignore_index,
        label_smoothing=label_smoothing,
        class_weights=class_weights,
        z_loss=z_loss,
        logit_softcap=logit_softcap,
        temperature=temperature,
    )
    precision = _check_precision(precision)
    _check_block("block_size_tokens", block_size_tokens)
    _check_block("block_size_vocab", block_size_vocab)
    labels = v.as_integer_labels(labels)
    if labels.shape != batch_shape:
        raise ValueError(
            "labels must have the shape of x without its last axis: expected "
            f"{batch_shape}, got labels.shape={labels.shape} (x.shape={x.shape})."
        )
    if bias is not None:
        bias = v.as_float_array("bias", bias)
        if bias.shape != (num_classes,):
            raise ValueError(f"bias must have shape ({num_classes},), got {bias.shape}.")
    where, token_weights = _token_weights(where, batch_shape)
    if shift:
        labels, where, token_weights = _shift_targets(labels, where, token_weights, batch_shape)
    class_mask, example_mask, cmask_kind = split_where_blocked(where, batch_shape, num_classes)
    if normalizer is not None:
        # A mean over a given count (global tokens over micro-batches or data shards): the
        # sum, divided outside the custom VJP so that the count may be traced.
        normalizer = jnp.asarray(normalizer, cdtype)
        if normalizer.ndim:
            raise ValueError(f"normalizer must be a scalar, got shape {normalizer.shape}.")
        reduction = "sum"

    n_total = math.prod(batch_shape)
    if n_total == 0:
        return _empty_result(batch_shape, options.reduction, cdtype, return_aux)

    layout = resolve_layout(x, w, 1, mesh=mesh, vocab_axis=vocab_axis, batch_axis=batch_axis)
    pad = vocab_padding(layout, num_classes)
    if pad:
        # The mesh does not divide the vocabulary: padding columns, masked out, so that they
        # take no probability or smoothing mass and match no label (pad's gradient slices).
        w = jnp.pad(w, ((0, 0), (0, pad)))
        bias = None if bias is None else jnp.pad(bias, (0, pad))
        class_mask, cmask_kind = pad_class_mask(class_mask, cmask_kind, num_classes, pad)
        if options.class_weights is not None:
            padded_weights = jnp.pad(options.class_weights, (0, pad))
            options = dataclasses.replace(options, class_weights=padded_weights)
    padded_total = num_classes + pad
    _, n_local, v_local = local_sizes(layout, batch_shape, padded_total)
    # Block sizes are global: on a mesh each device holds its share of a block.
    bn_max, bv_max = default_blocks(n_total, padded_total, reduction)
    bn_max = max(1, (block_size_tokens or bn_max) * n_local // n_total)
    bv_max = max(1, (block_size_vocab or bv_max) * v_local // padded_total)
    factor = layout.auto_factor if layout.mesh is None else 1
    pn, kn, bc = split_axis(n_local, bn_max, factor)
    pv, kv, tc = split_axis(v_local, bv_max, factor)
    padded_classes = kv * tc != v_local // pv
    if cmask_kind is None and padded_classes:
        cmask_kind = "shared"
    plan = Plan(
        smoothing=options.smoothing,
        has_z_loss=options.z_loss is not None,
        softcap=options.scaled_softcap,
        has_bias=bias is not None,
        has_cw=options.class_weights is not None,
        cmask=cmask_kind,
        has_example_mask=example_mask is not None,
        ignore_index=options.ignore_index,
        aux=bool(return_aux),
        cdtype=np.dtype(cdtype),
        n=n_local,
        pn=pn,
        kn=kn,
        bc=bc,
        v=v_local,
        pv=pv,
        kv=kv,
        tc=tc,
        v_global=num_classes,
        vocab_axes=layout.vocab_axes or None,
        data_axes=layout.data_axes or None,
        precision=precision,
        scale=options.scale,
    )
    call = Call(
        plan=plan,
        reduction=reduction,
        mesh=layout.mesh,
        batch_spec=layout.batch_spec,
        data_axes=layout.data_axes,
        vocab_axes=layout.vocab_axes,
    )
    nondiff = nondiff_inputs(labels, example_mask, class_mask, options, token_weights)
    # Declared: jax.custom_vjp (applied through functools.partial) leaves the result untyped.
    outputs: tuple[jax.Array, ...]
    if reduction != "none" and kv == 1:
        outputs = reduced_loss(call, x, w, bias, nondiff)
        loss, *rows = outputs
    else:
        outputs = rows_loss(call, x, w, bias, nondiff)
        loss, *rows = outputs
        loss = reduce_loss(loss, reduction, denominator_weights=rows[3])
    if normalizer is not None:
        loss = safe_divide(loss, normalizer)
    if not return_aux:
        return loss
    return loss, _make_aux(*rows, labels=labels, token_weights=token_weights, cdtype=cdtype)


def _token_weights(where, batch_shape):
    """(``where`` as a boolean mask, per-token weights or ``None``): a floating ``where`` of
    the batch's rank weighs tokens (0 leaves a token out, as ``False`` does)."""
    if where is None:
        return None, None
    where = jnp.asarray(where)
    if not jnp.issubdtype(where.dtype, jnp.floating):
        return where, None
    if where.ndim > len(batch_shape):
        raise TypeError(
            "a floating where= holds per-token weights, with at most the rank of the batch "
            f"{batch_shape}; a class mask must be boolean, got {where.dtype} with shape "
            f"{where.shape}."
        )
    v.check_broadcastable("where", where, batch_shape, "the batch (x without its last axis)")
    weights = jnp.broadcast_to(where, batch_shape)
    return weights != 0, weights


def _shift_targets(labels, where, token_weights, batch_shape):
    """Next-token targets: position t predicts token t + 1 of the last batch axis (time); the
    last position has no target. ``where`` / weights refer to the tokens and move with them."""
    if not batch_shape:
        raise ValueError("shift=True needs x with a time axis: x[..., T, D] and labels[..., T].")
    time = len(batch_shape) - 1
    shifted = lambda a, fill: jnp.concatenate(
        [
            lax.slice_in_dim(a, 1, None, axis=time),
            jnp.full_like(lax.slice_in_dim(a, 0, 1, axis=time), fill),
        ],
        axis=time,
    )
    labels = shifted(labels, 0)
    has_target = jnp.arange(batch_shape[-1]) < batch_shape[-1] - 1
    if token_weights is not None:
        token_weights = shifted(token_weights, 0)
    mask = jnp.broadcast_to(has_target, batch_shape)
    if where is not None:
        where = jnp.asarray(where)
        if where.ndim == len(batch_shape) + 1:
            raise ValueError(
                "shift=True takes a token mask (the rank of labels), not a class mask."
            )
        mask = mask & shifted(jnp.broadcast_to(where, batch_shape), False)
    return labels, mask, token_weights


def _make_aux(lse, arg, valid, denw, entropy, label_logprob, labels, token_weights, cdtype):
    """The aux outputs from the per-token results (argmax, validity and entropy carry no
    gradient; the logsumexp and the label log-probability do, through the custom VJPs)."""
    arg, valid, denw, entropy = (lax.stop_gradient(t) for t in (arg, valid, denw, entropy))
    counted = valid.astype(cdtype) if token_weights is None else jnp.where(valid, token_weights, 0)
    correct = jnp.sum(jnp.where(arg == labels, counted, 0))
    accuracy = safe_divide(correct, jnp.sum(counted))
    # Tokens that do not count get 0, which matches the gradient they pass back (none).
    lse = jnp.where(valid, lse, 0)
    return LinearCrossEntropyAux(
        logsumexp=lse.astype(cdtype),
        entropy=entropy.astype(cdtype),
        label_logprob=label_logprob.astype(cdtype),
        argmax=arg.astype(jnp.int32),
        accuracy=accuracy,
        weight_sum=jnp.sum(denw),
    )


def _empty_result(batch_shape, reduction, cdtype, return_aux):
    """The result of a call with no tokens: zeros of the right shapes."""
    loss = jnp.zeros(batch_shape, cdtype)
    if reduction != "none":
        loss = jnp.zeros((), cdtype)
    if not return_aux:
        return loss
    rows = jnp.zeros(batch_shape, cdtype)
    scalar = jnp.zeros((), cdtype)
    aux = LinearCrossEntropyAux(rows, rows, rows, jnp.zeros(batch_shape, jnp.int32), scalar, scalar)
    return loss, aux
