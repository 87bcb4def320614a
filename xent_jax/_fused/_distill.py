"""The fused distillation loss: argument checks, the block plan, ``shard_map`` wrapping and the
custom VJPs. The per-device arithmetic and loops are in :mod:`xent_jax._fused._distill_local`."""

from __future__ import annotations

import functools
import math
import numbers
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.custom_derivatives import SymbolicZero
from jax.sharding import PartitionSpec as P
from jax.typing import ArrayLike

from xent_jax import _validation as v
from xent_jax._fused._custom_vjp import shard_mapped
from xent_jax._fused._distill_local import (
    DIVERGENCES,
    DistillPlan,
    Teacher,
    local_backward,
    local_fused,
    local_reduced,
    local_rows,
)
from xent_jax._labels import comparable_labels
from xent_jax._mesh import local_sizes, resolve_layout, spec_entry

# Default blocks: the whole local vocabulary per block (strip) up to _MAX_STRIP_CLASSES classes,
# with about _BLOCK_ELEMENTS logits of each model per block but at least _MIN_TOKENS tokens
# (smaller token blocks starve the weight-gradient product, which contracts over tokens);
# beyond that, tiles of _TILE_TOKENS x _BLOCK_ELEMENTS / _TILE_TOKENS.
_BLOCK_ELEMENTS = 1 << 20
_MIN_TOKENS = 128
_MAX_STRIP_CLASSES = 65536
_TILE_TOKENS = 256


def linear_distillation_loss(
    x: ArrayLike,
    w: ArrayLike,
    *,
    teacher_logits: ArrayLike | None = None,
    teacher_x: ArrayLike | None = None,
    teacher_w: ArrayLike | None = None,
    divergence: str = "kl",
    beta: float | None = None,
    temperature: float = 1.0,
    labels: ArrayLike | None = None,
    ignore_index: int | None = None,
    where: ArrayLike | None = None,
    reduction: v.Reduction = "none",
    precision: str | jax.lax.Precision | None = None,
    block_size_tokens: int | None = None,
    block_size_vocab: int | None = None,
    mesh: Any = None,
    vocab_axis: str | tuple[str, ...] | None = None,
    batch_axis: str | tuple[str, ...] | None = None,
) -> jax.Array:
    r"""Distillation divergence between a teacher and the student logits ``x @ w``, without
    materialising either model's ``N x V`` logits.

    Per token, with temperature :math:`T`, student :math:`q = \operatorname{softmax}(x W / T)`
    and teacher :math:`p = \operatorname{softmax}(z_t / T)`, where :math:`z_t` is
    ``teacher_logits`` or ``teacher_x @ teacher_w``:

    .. math::
        \mathrm{kl}: \; D_{KL}(p \,\|\, q) = \sum_c p_c \log \frac{p_c}{q_c}, \qquad
        \mathrm{reverse\_kl}: \; D_{KL}(q \,\|\, p),

        \mathrm{js}: \; \beta\, D_{KL}(p \,\|\, m) + (1 - \beta)\, D_{KL}(q \,\|\, m),
        \qquad m = \beta p + (1 - \beta) q,

    with :math:`0 \log 0 = 0` and :math:`\log m` computed in log space
    (:math:`\operatorname{logaddexp}(\log\beta + \log p, \log(1-\beta) + \log q)`), so neither
    distribution underflows. The same numbers as ``xent_jax.kl_divergence(p, q)``,
    ``kl_divergence(q, p)`` and, at :math:`\beta = 1/2`, ``js_divergence(p, q)`` on the
    materialised softmaxes.

    Conventions:

    * ``"kl"`` is the forward KL of Hinton et al. (teacher first: mode covering);
      ``"reverse_kl"`` is mode seeking. ``beta`` weighs the *teacher* in the mixture, as in
      Liger Kernel's JSD and TRL's GKD; it must be in (0, 1): the generalised JSD tends to 0
      at either end, so Liger's and TRL's ``beta = 0`` / ``1`` (which switch to forward /
      reverse KL) are ``divergence="kl"`` / ``"reverse_kl"`` here.
    * Both distributions are taken at the temperature :math:`T`, and the loss is **not**
      multiplied by :math:`T^2`: the value is the divergence itself (JS stays within
      :math:`\log 2`), comparable across temperatures and with the functions above, as Liger's
      ``LigerFusedLinearJSD`` does. For Hinton's weighting (gradients of a size independent of
      :math:`T` when mixed with a hard-label loss), multiply the result by ``temperature**2``.
    * The teacher receives no gradient (it is wrapped in ``jax.lax.stop_gradient``): gradients
      flow to ``x`` and ``w`` only. ``temperature`` and ``beta`` may be traced but not
      differentiated (that raises).

    Only one block of ``[block_size_tokens, block_size_vocab]`` logits of each model exists at a
    time; the backward pass (a custom VJP) recomputes them from the saved per-token
    logsumexps. With ``reduction="sum"`` / ``"mean"`` and the whole vocabulary in one block
    (the default up to 65536 classes per device) the gradients are formed in the same pass as
    the loss, so each block of logits is computed once. With vocabulary tiles it is computed
    three times (the two logsumexps, the divergence, the backward pass): about twice the
    time of the materialised loss. Given ``teacher_logits`` are read block by block, never
    copied.

    Sharding works as in :func:`linear_softmax_cross_entropy_with_integer_labels`: under plain
    ``jax.jit``, ``w`` split along ``V`` (vocab-parallel) and/or ``x`` split along tokens
    (data-parallel) over a mesh with explicit axes, or an explicit ``mesh=`` with
    ``vocab_axis`` / ``batch_axis``, run inside ``jax.shard_map`` with a ``pmax`` / ``psum`` of
    per-token statistics; the teacher arrays follow the layout of ``x`` and ``w``.

    Args:
      x: ``[..., D]`` student hidden states, any float dtype; bfloat16 / float16 are multiplied
        with float32 accumulation and the loss is computed in float32.
      w: ``[D, V]`` student output projection.
      teacher_logits: ``[..., V]`` teacher logits (the shape of ``x @ w``); ``-inf`` entries
        have teacher probability 0. Give either this or ``teacher_x`` and ``teacher_w``.
      teacher_x: ``[..., Dt]`` teacher hidden states (the batch shape of ``x``).
      teacher_w: ``[Dt, V]`` teacher output projection.
      divergence: ``"kl"`` (forward, :math:`D_{KL}(p\|q)`), ``"reverse_kl"`` or ``"js"``.
      beta: mixture weight of the teacher for ``"js"``, in (0, 1); default 0.5 (the symmetric
        Jensen-Shannon divergence). Only for ``"js"``.
      temperature: :math:`T > 0`, dividing both models' logits.
      labels: optional ``[...]`` integer labels, used only to drop the tokens whose label is
        ``ignore_index`` (a causal LM's shifted labels, say).
      ignore_index: label value of the tokens to drop (needs ``labels``).
      where: optional boolean token mask broadcastable to ``[...]``: ``False`` tokens give 0,
        no gradient, and leave the mean.
      reduction: ``"none"`` (per token, shape ``[...]``), ``"sum"``, or ``"mean"`` over the
        tokens that count (0.0 when there are none; PyTorch's ``"batchmean"``).
      precision: precision of the matrix products, as in ``jnp.dot`` (``None`` follows
        ``jax.default_matmul_precision``; ``"highest"`` for full float32 on GPUs / TPUs).
      block_size_tokens: at most this many tokens per block (global: on a mesh each device
        holds its share). Default: about :math:`2^{20}` logits per block, at least 128
        tokens.
      block_size_vocab: at most this many classes per tile (global, like
        ``block_size_tokens``). Default: the whole local vocabulary up to 65536 classes, else
        tiles with an online logsumexp.
      mesh: optional mesh to ``shard_map`` over, with ``vocab_axis`` (the mesh axes the
        classes are split over) and ``batch_axis`` (the mesh axes the first batch dimension is
        split over). Not needed when the arrays carry explicit shardings.
      vocab_axis: see ``mesh``.
      batch_axis: see ``mesh``.

    Returns:
      The loss, float32 (float64 for float64 inputs): per token with ``reduction="none"``,
      else a scalar.

    Examples:
      >>> import jax, jax.numpy as jnp
      >>> import xent_jax
      >>> x = jnp.array([[1.0, 0.5], [0.0, -1.0], [2.0, 1.0]])
      >>> w = jnp.array([[1.0, 0.0, -1.0], [0.5, 2.0, 0.0]])
      >>> teacher = jnp.array([[2.0, 0.0, 0.0], [0.0, 1.0, 0.0], [1.0, 1.0, -1.0]])
      >>> xent_jax.linear_distillation_loss(x, w, teacher_logits=teacher, temperature=2.0)
      Array([0.0813, 0.2159 , 0.0713 ], dtype=float32)
      >>> p = jax.nn.softmax(teacher / 2.0)
      >>> q = jax.nn.softmax(x @ w / 2.0)
      >>> xent_jax.kl_divergence(p, q)
      Array([0.0813, 0.2159, 0.0713], dtype=float32)
      >>> xent_jax.linear_distillation_loss(x, w, teacher_logits=teacher, divergence="js",
      ...     reduction="mean", labels=jnp.array([1, -100, 2]), ignore_index=-100)
      Array(0.04289, dtype=float32)
      >>> jax.grad(xent_jax.linear_distillation_loss, argnums=1)(
      ...     x, w, teacher_logits=teacher, reduction="mean").shape
      (2, 3)
    """
    x = v.as_float_array("x", x)
    w = v.as_float_array("w", w)
    if x.ndim < 1:
        raise ValueError(f"x must have at least one dimension (features), got shape {x.shape}.")
    if w.ndim != 2 or w.shape[0] != x.shape[-1] or w.shape[1] == 0:
        raise ValueError(
            f"w must have shape [D, V] with D = x.shape[-1] = {x.shape[-1]} and V > 0, got "
            f"w.shape={w.shape} (x.shape={x.shape})."
        )
    batch_shape, num_classes = x.shape[:-1], w.shape[1]
    teacher_x, teacher_w, teacher_logits = _check_teacher(
        x, num_classes, teacher_logits, teacher_x, teacher_w
    )
    dtypes = [a.dtype for a in (x, w, teacher_x, teacher_w, teacher_logits) if a is not None]
    cdtype = v.compute_dtype(*dtypes)
    if divergence not in DIVERGENCES:
        raise ValueError(f"divergence must be one of {DIVERGENCES}, got {divergence!r}.")
    beta_value = _check_beta(beta, divergence)
    v.check_positive("temperature", temperature)
    v.check_reduction(reduction)
    precision = _check_precision(precision)
    _check_block("block_size_tokens", block_size_tokens)
    _check_block("block_size_vocab", block_size_vocab)
    keep = _token_mask(batch_shape, labels, ignore_index, where)

    n_total = math.prod(batch_shape)
    if n_total == 0:
        return jnp.zeros(batch_shape if reduction == "none" else (), cdtype)

    layout = resolve_layout(x, w, 1, mesh=mesh, vocab_axis=vocab_axis, batch_axis=batch_axis)
    _, n_local, v_local = local_sizes(layout, batch_shape, num_classes)
    bn_max, bv_max = _default_blocks(n_local, v_local)
    # User block sizes are global: on a mesh each device holds its share of a block.
    if block_size_tokens is not None:
        bn_max = max(1, block_size_tokens * n_local // n_total)
    if block_size_vocab is not None:
        bv_max = max(1, block_size_vocab * v_local // num_classes)
    kn, bn = _split(n_local, bn_max)
    kv, bv = _split(v_local, bv_max)
    plan = DistillPlan(
        divergence=divergence,
        reduction=reduction,
        n=n_local,
        bn=bn,
        kn=kn,
        v=v_local,
        bv=bv,
        kv=kv,
        cdtype=np.dtype(cdtype),
        precision=precision,
        mesh=layout.mesh,
        batch_spec=tuple(layout.batch_spec),
        data_axes=layout.data_axes,
        vocab_axes=layout.vocab_axes,
    )
    stop = lambda a: None if a is None else jax.lax.stop_gradient(a)
    teacher = Teacher(
        x=stop(teacher_x),
        w=stop(teacher_w),
        logits=stop(teacher_logits),
        keep=keep,
        beta=_constant("beta", jnp.asarray(beta_value, cdtype)),
        temperature=_constant("temperature", jnp.asarray(temperature, cdtype)),
    )
    if reduction == "none":
        return _rows_loss(plan, x, w, teacher)
    if kv == 1:
        return _reduced_loss(plan, x, w, teacher)
    loss = jnp.asarray(_rows_loss(plan, x, w, teacher))
    total = jnp.sum(loss)
    if reduction == "sum":
        return total
    den = jnp.sum(keep, dtype=cdtype)
    # Double where: a mean over nothing is 0, and its gradient stays finite.
    return jnp.where(den != 0, total / jnp.where(den != 0, den, 1), 0)


# ----------------------------------------------------------------------------------------------
# Argument checks
# ----------------------------------------------------------------------------------------------


def _check_teacher(x, num_classes, teacher_logits, teacher_x, teacher_w):
    """The teacher as (x, w, logits), exactly one of logits or (x, w) given, shapes checked."""
    batch_shape = x.shape[:-1]
    hidden = teacher_x is not None or teacher_w is not None
    if (teacher_logits is None) == (not hidden):
        raise ValueError(
            "give the teacher either as teacher_logits=[..., V] or as teacher_x=[..., Dt] "
            "with teacher_w=[Dt, V], not both and not neither."
        )
    if teacher_logits is not None:
        logits = v.as_float_array("teacher_logits", teacher_logits)
        if logits.shape != (*batch_shape, num_classes):
            raise ValueError(
                "teacher_logits must have the shape of x @ w, "
                f"{(*batch_shape, num_classes)}, got {logits.shape}."
            )
        return None, None, logits
    if teacher_x is None or teacher_w is None:
        raise ValueError("teacher_x and teacher_w go together: give both.")
    tx = v.as_float_array("teacher_x", teacher_x)
    tw = v.as_float_array("teacher_w", teacher_w)
    if tx.ndim < 1 or tx.shape[:-1] != batch_shape:
        raise ValueError(
            f"teacher_x must have shape [..., Dt] with the batch shape of x, {batch_shape}, got "
            f"{tx.shape}."
        )
    if tw.shape != (tx.shape[-1], num_classes):
        raise ValueError(
            f"teacher_w must have shape [Dt, V] = {(tx.shape[-1], num_classes)}, got {tw.shape}."
        )
    return tx, tw, None


def _check_beta(beta, divergence: str):
    """``beta`` for ``"js"`` (default 0.5, in (0, 1) when concrete); refused for the KLs."""
    if divergence != "js":
        if beta is not None:
            raise ValueError(
                f"beta is the mixture weight of divergence='js'; divergence={divergence!r} "
                "takes none (Liger's and TRL's beta=0 / 1 are divergence='kl' / 'reverse_kl')."
            )
        return 0.5
    if beta is None:
        return 0.5
    if v.is_traced(beta):
        return beta  # A traced value cannot be checked here; it is the caller's to keep in range.
    if isinstance(beta, bool) or not (isinstance(beta, numbers.Real) or np.ndim(beta) == 0):
        raise TypeError(f"beta must be a real number, got {beta!r}.")
    if not 0.0 < float(beta) < 1.0:
        raise ValueError(
            f"beta must be in (0, 1), got {beta!r}; the generalised JSD is 0 at either end "
            "(use divergence='kl' or 'reverse_kl' for the endpoints of Liger and TRL)."
        )
    return beta


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
    if value is not None and (
        isinstance(value, bool) or not isinstance(value, int | np.integer) or value < 1
    ):
        raise ValueError(f"{name} must be a positive integer or None, got {value!r}.")


def _token_mask(batch_shape, labels, ignore_index, where) -> jax.Array:
    """Boolean ``[...]``: the tokens that count (``where`` and not ``ignore_index``)."""
    keep = jnp.ones(batch_shape, jnp.bool_)
    if (labels is None) != (ignore_index is None):
        raise ValueError(
            "labels only mark the tokens to ignore here: give labels together with "
            "ignore_index (or neither)."
        )
    if labels is not None:
        labels = v.as_integer_labels(labels)
        if labels.shape != batch_shape:
            raise ValueError(
                f"labels must have the batch shape of x, {batch_shape}, got {labels.shape}."
            )
        if isinstance(ignore_index, bool) or not isinstance(ignore_index, int | np.integer):
            raise TypeError(f"ignore_index must be an integer, got {ignore_index!r}.")
        keep = comparable_labels(labels) != ignore_index
    mask = v.as_mask("where", where)
    if mask is not None:
        v.check_broadcastable("where", mask, batch_shape, "the batch (x without its last axis)")
        keep = keep & jnp.broadcast_to(mask, batch_shape)
    return keep


@functools.partial(jax.custom_jvp, nondiff_argnums=(0,))
def _constant(name: str, value: jax.Array) -> jax.Array:
    return value


@functools.partial(_constant.defjvp, symbolic_zeros=True)
def _constant_jvp(name, primals, tangents):
    if not isinstance(tangents[0], SymbolicZero):
        # The custom VJPs give these options no gradient: refuse rather than return a silent 0.
        raise TypeError(
            f"linear_distillation_loss gives no derivative with respect to {name}; "
            "differentiate the materialised divergence for it."
        )
    return primals[0], tangents[0]


# ----------------------------------------------------------------------------------------------
# Block plan
# ----------------------------------------------------------------------------------------------


def _default_blocks(n: int, v_local: int) -> tuple[int, int]:
    """Default (tokens, classes) per block on one device."""
    if v_local <= _MAX_STRIP_CLASSES:
        return max(_MIN_TOKENS, _BLOCK_ELEMENTS // v_local), v_local
    return _TILE_TOKENS, _BLOCK_ELEMENTS // _TILE_TOKENS


def _split(length: int, max_block: int) -> tuple[int, int]:
    """(count, size) of the fewest balanced blocks of at most ``max_block`` covering ``length``."""
    count = -(-length // max(1, min(max_block, length)))
    return count, -(-length // count)


# ----------------------------------------------------------------------------------------------
# shard_map wrapping and custom VJPs
# ----------------------------------------------------------------------------------------------


def _specs(plan: DistillPlan, teacher: Teacher) -> dict:
    """``PartitionSpec`` of every argument and result of the local entry points."""
    batch = plan.batch_spec
    vocab = spec_entry(plan.vocab_axes)
    rows = P(*batch)
    return {
        "x": P(*batch, None),
        "w": P(None, vocab),
        "rows": rows,
        "scalar": P(),
        # Teacher's fields in order: x, w, logits, keep, beta, temperature.
        "teacher": Teacher._make(
            (
                None if teacher.x is None else P(*batch, None),
                None if teacher.w is None else P(None, vocab),
                None if teacher.logits is None else P(*batch, vocab),
                rows,
                P(),
                P(),
            )
        ),
    }


def _mapped(plan: DistillPlan, teacher: Teacher, local_fn, extra_in: tuple, out_specs):
    """``local_fn(plan, x, w, teacher, *extra)`` on every device of the mesh (plain without)."""
    specs = _specs(plan, teacher)
    in_specs = (specs["x"], specs["w"], specs["teacher"], *(specs[k] for k in extra_in))
    return shard_mapped(plan, local_fn, in_specs, out_specs(specs))


def _rows_out(specs):
    return (specs["rows"],) * 4


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _rows_loss(plan: DistillPlan, x, w, teacher: Teacher):
    """Per-token divergence; the backward pass recomputes every tile."""
    return _mapped(plan, teacher, local_rows, (), _rows_out)(x, w, teacher)[0]


def _rows_loss_fwd(plan: DistillPlan, x, w, teacher: Teacher):
    loss, lse_s, lse_t, center = _mapped(plan, teacher, local_rows, (), _rows_out)(x, w, teacher)
    return loss, (x, w, teacher, lse_s, lse_t, center)


def _rows_loss_bwd(plan: DistillPlan, residuals, cotangent):
    x, w, teacher, lse_s, lse_t, center = residuals
    grads_out = lambda s: (s["x"], s["w"])
    fn = _mapped(plan, teacher, local_backward, ("rows",) * 4, grads_out)
    dx, dw = fn(x, w, teacher, lse_s, lse_t, center, cotangent)
    return dx, dw, None


_rows_loss.defvjp(_rows_loss_fwd, _rows_loss_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _reduced_loss(plan: DistillPlan, x, w, teacher: Teacher):
    """Reduced divergence (strip schedule); only the loss when not differentiated."""
    return _mapped(plan, teacher, local_reduced, (), lambda s: s["scalar"])(x, w, teacher)


def _reduced_loss_fwd(plan: DistillPlan, x, w, teacher: Teacher):
    out_specs = lambda s: (s["scalar"], (s["x"], s["w"]))
    loss, grads = _mapped(plan, teacher, local_fused, (), out_specs)(x, w, teacher)
    return loss, grads


def _reduced_loss_bwd(plan: DistillPlan, grads, cotangent):
    dx, dw = grads
    scale = lambda g: (cotangent * g).astype(g.dtype)
    return scale(dx), scale(dw), None


_reduced_loss.defvjp(_reduced_loss_fwd, _reduced_loss_bwd)
