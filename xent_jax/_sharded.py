"""Vocab-parallel and data-parallel cross-entropy on a :class:`jax.sharding.Mesh`.

Two ways in, with the same results as on one device:

* Plain ``jax.jit`` on arrays with a ``NamedSharding``. On a mesh with explicit axes (the
  default of :func:`jax.make_mesh`) the shardings are part of the arrays' types, so the loss
  reads them at trace time and runs its blocks inside :func:`jax.shard_map`: each device reduces
  its own block of classes (max and sum of exponentials, combined by ``pmax`` / ``psum``; the
  label's logit comes from the shard that owns it), and each device handles its own tokens.
  On a mesh with automatic axes the shardings are not visible at trace time; the blocks are
  then laid out so that XLA's partitioner splits every block evenly over the devices (see
  :mod:`xent_jax._fused`), again without gathering logits.
* An explicit ``mesh=`` with ``vocab_axis=`` / ``batch_axis=`` (an addition, for meshes with
  automatic axes when you want ``shard_map`` anyway).

Nothing of size ``N x V`` is ever gathered: the only collectives move per-token vectors, the
``[N, D]`` gradient of the input (summed over the vocabulary shards) and, with data
parallelism, the ``[D, V]`` gradient of the weights (summed over the token shards).
"""

from __future__ import annotations

import functools
import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec as P
from jax.typing import ArrayLike

from xent_jax import _validation as v
from xent_jax._fused._api import _split_where, _static_float
from xent_jax._fused._blocks import _Plan
from xent_jax._fused._custom_vjp import _mapped, _partition_specs, _spec_entry
from xent_jax._fused._local import _Call, _denominator_weights, _NonDiffInputs, _prepare_rows
from xent_jax._fused._tile_math import (
    _combine_stats,
    _finish_rows,
    _init_stats,
    _Stats,
    _tile_grad,
    _tile_mask,
    _transform_logits,
    _update_stats,
)
from xent_jax._reduction import reduce_loss


class Layout(NamedTuple):
    """How a call is laid out on a mesh.

    Attributes:
      mesh: the mesh to ``shard_map`` over, or ``None`` (single device, or automatic axes).
      batch_spec: ``PartitionSpec`` entries of the batch dimensions (tokens).
      vocab_axes: mesh axes the classes are split over.
      auto_factor: number of devices of a mesh with automatic axes (1 otherwise); used to lay
        out blocks so that XLA's partitioner needs no gathers.
    """

    mesh: Any
    batch_spec: tuple
    vocab_axes: tuple[str, ...]
    auto_factor: int

    @property
    def data_axes(self) -> tuple[str, ...]:
        return tuple(a for entry in self.batch_spec for a in axes_of(entry))


def axes_of(entry) -> tuple[str, ...]:
    """``PartitionSpec`` entry -> tuple of axis names."""
    if entry is None:
        return ()
    if isinstance(entry, str):
        return (entry,)
    return tuple(entry)


def axes_size(mesh, axes: tuple[str, ...]) -> int:
    return math.prod(mesh.shape[a] for a in axes) if axes else 1


def _sharding_of(a: jax.Array):
    try:
        return jax.typeof(a).sharding
    except Exception:  # pragma: no cover - very old JAX or exotic tracers
        return None


def _padded_spec(sharding, ndim: int) -> tuple:
    spec = tuple(getattr(sharding, "spec", ()) or ())
    return spec + (None,) * (ndim - len(spec))


def _explicit_axes(mesh) -> set[str]:
    types = getattr(mesh, "axis_types", None) or ()
    names = getattr(mesh, "axis_names", None) or ()
    explicit = getattr(jax.sharding.AxisType, "Explicit", None)
    return {n for n, t in zip(names, types, strict=False) if t == explicit}


def _auto_factor(sharding) -> int:
    mesh = getattr(sharding, "mesh", None)
    if mesh is None or not getattr(mesh, "axis_names", ()):
        return 1
    auto = jax.sharding.AxisType.Auto
    names, types = mesh.axis_names, mesh.axis_types
    return math.prod(mesh.shape[n] for n, t in zip(names, types, strict=True) if t == auto)


def resolve_layout(
    batched: jax.Array,
    class_sharded: jax.Array,
    class_dim: int,
    *,
    mesh=None,
    vocab_axis=None,
    batch_axis=None,
) -> Layout:
    """Finds how ``batched`` (tokens along its leading dims) and ``class_sharded`` (classes along
    ``class_dim``) are sharded.

    Explicit arguments win; otherwise the shardings in the arrays' types (explicit mesh axes)
    are used. The last dimension of ``batched`` is its feature / class dimension.
    """
    nbatch = batched.ndim - 1
    if mesh is not None or vocab_axis is not None or batch_axis is not None:
        if mesh is None:
            mesh = jax.sharding.get_abstract_mesh()
            if not getattr(mesh, "axis_names", ()):
                raise ValueError(
                    "vocab_axis / batch_axis need a mesh: pass mesh=... or call under "
                    "jax.sharding.use_mesh / jax.set_mesh."
                )
        vocab_axes = axes_of(vocab_axis)
        batch_spec = (batch_axis,) + (None,) * (nbatch - 1) if nbatch else ()
        if batch_axis is not None and not nbatch:
            raise ValueError("batch_axis needs inputs with a batch dimension.")
        for a in vocab_axes + tuple(x for e in batch_spec for x in axes_of(e)):
            if a not in mesh.axis_names:
                raise ValueError(f"axis {a!r} is not an axis of the mesh {mesh.axis_names}.")
        return Layout(mesh, batch_spec, vocab_axes, 1)

    bs = _sharding_of(batched)
    cs = _sharding_of(class_sharded)
    factor = max(
        _auto_factor(bs) if bs is not None else 1, _auto_factor(cs) if cs is not None else 1
    )
    if bs is None or cs is None:
        return Layout(None, (None,) * nbatch, (), factor)
    mesh = getattr(cs, "mesh", None) or getattr(bs, "mesh", None)
    explicit = _explicit_axes(getattr(bs, "mesh", None)) | _explicit_axes(getattr(cs, "mesh", None))
    if not explicit:
        return Layout(None, (None,) * nbatch, (), factor)
    bspec = _padded_spec(bs, batched.ndim)
    cspec = _padded_spec(cs, class_sharded.ndim)
    batch_spec = tuple(bspec[:nbatch])
    vocab_axes = axes_of(cspec[class_dim])
    if not vocab_axes and not any(axes_of(e) for e in batch_spec):
        return Layout(None, (None,) * nbatch, (), factor)
    return Layout(mesh, batch_spec, vocab_axes, 1)


# ----------------------------------------------------------------------------------------------
# Integer-label softmax cross-entropy on logits sharded along the class axis
# ----------------------------------------------------------------------------------------------


def _logits_call(layout: Layout, batch_shape, num_classes: int, opts: dict, cmask_kind, cdtype):
    mesh = layout.mesh
    local = []
    for dim, entry in zip(batch_shape, layout.batch_spec, strict=True):
        size = axes_size(mesh, axes_of(entry))
        if dim % size:
            raise ValueError(
                f"a batch dimension of size {dim} is split over mesh axes {axes_of(entry)} of "
                f"size {size}, which does not divide it."
            )
        local.append(dim // size)
    vsize = axes_size(mesh, layout.vocab_axes)
    if num_classes % vsize:
        raise ValueError(
            f"K={num_classes} classes are split over mesh axes {layout.vocab_axes} of size "
            f"{vsize}, which does not divide it."
        )
    n, v_local = math.prod(local), num_classes // vsize
    plan = _Plan(
        eps=opts["label_smoothing"],
        z_loss=opts["z_loss"],
        softcap=opts["logit_softcap"],
        has_bias=False,
        has_cw=opts["has_cw"],
        cmask=cmask_kind,
        has_example_mask=opts["has_example_mask"],
        ignore_index=opts["ignore_index"],
        aux=False,
        cdtype=cdtype,
        n=n,
        pn=1,
        kn=1,
        bc=n,
        v=v_local,
        pv=1,
        kv=1,
        tc=v_local,
        v_global=num_classes,
        vocab_axes=layout.vocab_axes or None,
        data_axes=layout.data_axes or None,
    )
    return _Call(
        plan=plan,
        reduction="none",
        mesh=mesh,
        batch_spec=layout.batch_spec,
        data_axes=layout.data_axes,
        vocab_axes=layout.vocab_axes,
    )


def _local_logits(call, z, nondiff):
    """Shared by the forward and backward passes: stats of the local block of classes."""
    plan = call.plan
    inputs = _prepare_rows(call, nondiff, None)
    raw_logits = z.reshape(plan.n, plan.v).astype(plan.cdtype)
    mask = _tile_mask(plan, inputs, 0, 0)
    logits, masked_logits = _transform_logits(plan, inputs, raw_logits, 0, mask)
    return plan, inputs, logits, masked_logits, mask


def _local_logits_forward(call, z, nondiff):
    plan, inputs, _, masked_logits, _ = _local_logits(call, z, nondiff)
    stats = _init_stats(plan)
    rows = _update_stats(
        plan,
        tuple(field[0] for field in stats),
        masked_logits,
        inputs.labels[0],
        inputs.cls[0],
        None if inputs.cw is None else inputs.cw[0],
    )
    stats = _combine_stats(plan, _Stats(*(field[None] for field in rows)))
    rows = _finish_rows(plan, inputs, stats)
    ok = rows.grad_ok
    out = (
        rows.loss,
        rows.lse,
        rows.valid,
        _denominator_weights(plan, inputs, rows.valid),
        jnp.where(ok, rows.prob_coef, 0),
        jnp.where(ok, rows.label_coef, 0),
        jnp.where(ok, rows.smooth_coef, 0),
    )
    batch = z.shape[:-1]
    return tuple(o.reshape(batch) for o in out)


def _local_logits_backward(call, z, nondiff, lse, prob_coef, label_coef, smooth_coef, cotangent):
    plan, inputs, logits, masked_logits, mask = _local_logits(call, z, nondiff)
    flat = lambda r: r.reshape(plan.n).astype(plan.cdtype)
    g = flat(cotangent)
    cw = None if inputs.cw is None else inputs.cw[0]
    du = _tile_grad(
        plan,
        logits,
        masked_logits,
        mask,
        flat(lse),
        g * flat(prob_coef),
        g * flat(label_coef),
        g * flat(smooth_coef),
        inputs.labels[0],
        inputs.cls[0],
        cw,
    )
    return du.reshape(z.shape).astype(z.dtype)


def _logits_specs(call, nondiff):
    specs = _partition_specs(call, nondiff)
    return P(*call.batch_spec, _spec_entry(call.vocab_axes)), specs


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _logits_loss(call, z, nondiff):
    return _logits_forward(call, z, nondiff)[:4]


def _logits_forward(call, z, nondiff):
    zspec, specs = _logits_specs(call, nondiff)
    in_specs = (zspec, specs["nondiff"])
    fn = _mapped(call, _local_logits_forward, in_specs, (specs["rows"],) * 7)
    return fn(z, nondiff)


def _logits_loss_fwd(call, z, nondiff):
    out = _logits_forward(call, z, nondiff)
    return out[:4], (z, nondiff, *out[1:2], *out[4:])


def _logits_loss_bwd(call, residuals, cotangents):
    z, nondiff, lse, prob_coef, label_coef, smooth_coef = residuals
    zspec, specs = _logits_specs(call, nondiff)
    in_specs = (zspec, specs["nondiff"]) + (specs["rows"],) * 5
    fn = _mapped(call, _local_logits_backward, in_specs, zspec)
    coefs = (lse, prob_coef, label_coef, smooth_coef)
    return fn(z, nondiff, *coefs, cotangents[0]), None


_logits_loss.defvjp(_logits_loss_fwd, _logits_loss_bwd)


def vocab_parallel_softmax_cross_entropy_with_integer_labels(
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
    mesh: Any = None,
    vocab_axis: str | tuple[str, ...] | None = None,
    batch_axis: str | tuple[str, ...] | None = None,
) -> jax.Array:
    r"""Integer-label softmax cross-entropy of logits split along the class axis over a mesh.

    The same numbers and gradients as
    :func:`xent_jax.softmax_cross_entropy_with_integer_labels` (same options, same formula)

    .. math::
        \ell = (1 - \varepsilon)\, w_y \big(\operatorname{lse}(z) - z_y\big)
               + \frac{\varepsilon}{K} \sum_c w_c \big(\operatorname{lse}(z) - z_c\big)
               + \lambda_z \operatorname{lse}(z)^2,

    computed inside :func:`jax.shard_map`: each device reduces its own block of classes (row
    max combined by ``pmax``, sums of exponentials and the smoothing sums by ``psum``), the
    label's logit comes from the device that owns that class, and the gradient of each block
    of logits stays on its device. Nothing of the size of the logits is ever gathered.

    ``softmax_cross_entropy_with_integer_labels`` calls this by itself when the logits carry an
    explicit sharding along the class axis; call it directly to name the mesh axes of logits on
    a mesh with automatic axes.

    Args:
      logits: ``[..., K, ...]`` logits, class axis ``axis``, split over mesh axes along it.
      labels: integer labels, the shape of ``logits`` without ``axis``.
      axis: the class axis.
      where: as in :func:`xent_jax.softmax_cross_entropy_with_integer_labels`.
      ignore_index: label value of examples to ignore.
      label_smoothing: :math:`\varepsilon \in [0, 1)`.
      class_weights: ``[K]`` weight per class.
      z_loss: coefficient of the squared log-normaliser.
      logit_softcap: soft cap :math:`s`: logits become :math:`s \tanh(z / s)` first.
      reduction: ``"none"``, ``"sum"`` or ``"mean"``.
      mesh: the mesh (default: read from the logits' sharding, or the current mesh).
      vocab_axis: mesh axes the classes are split over (default: from the logits' sharding).
      batch_axis: mesh axes the first batch dimension is split over (default: from the logits'
        sharding).

    Returns:
      The loss, float32 (float64 for float64 logits).

    Examples:
      >>> import jax, jax.numpy as jnp
      >>> import xent_jax
      >>> mesh = jax.make_mesh((1,), ("model",), devices=jax.devices()[:1])
      >>> logits = jnp.array([[2.0, 1.0, 0.1, -1.0], [0.5, 2.5, 0.0, 0.3]])
      >>> labels = jnp.array([0, 1])
      >>> xent_jax.vocab_parallel_softmax_cross_entropy_with_integer_labels(
      ...     logits, labels, mesh=mesh, vocab_axis="model")
      Array([0.44931..., 0.28384...], dtype=float32)
      >>> xent_jax.softmax_cross_entropy_with_integer_labels(logits, labels)
      Array([0.44931..., 0.28384...], dtype=float32)
    """
    z = v.as_float_array("logits", logits)
    if z.ndim == 0:
        raise ValueError("logits must have at least one dimension (the class axis), got a scalar.")
    axis = v.normalize_axis(axis, z.ndim)
    v.check_reduction(reduction)
    eps = _static_float("label_smoothing", label_smoothing)
    v.check_label_smoothing(eps)
    zl = _static_float("z_loss", z_loss)
    v.check_nonnegative("z_loss", zl)
    cap = None if logit_softcap is None else _static_float("logit_softcap", logit_softcap)
    num_classes = z.shape[axis]
    batch_shape = z.shape[:axis] + z.shape[axis + 1 :]
    labels = v.as_integer_labels(labels)
    if labels.shape != batch_shape:
        raise ValueError(
            "labels must have the shape of logits without the class axis: expected "
            f"{batch_shape}, got labels.shape={labels.shape}."
        )
    weights = v.check_class_weights(class_weights, num_classes)
    mask = v.as_mask("where", where)
    if mask is not None and mask.ndim == z.ndim:
        v.check_broadcastable("where", mask, z.shape, "logits")
        mask = jnp.moveaxis(mask, axis, -1)
    z = jnp.moveaxis(z, axis, -1)
    class_mask, example_mask, cmask_kind = (None, None, None)
    if mask is not None:
        class_mask, example_mask, cmask_kind = _split_where(mask, batch_shape, num_classes)
    cdtype = np.dtype(v.compute_dtype(z.dtype))
    if math.prod(batch_shape) == 0:
        return reduce_loss(jnp.zeros(batch_shape, cdtype), reduction)
    layout = resolve_layout(
        z, z, z.ndim - 1, mesh=mesh, vocab_axis=vocab_axis, batch_axis=batch_axis
    )
    if layout.mesh is None:
        raise ValueError(
            "the logits carry no explicit sharding: pass mesh= and vocab_axis= (and batch_axis=)"
        )
    opts = {
        "label_smoothing": eps,
        "z_loss": zl,
        "logit_softcap": cap,
        "has_cw": weights is not None,
        "has_example_mask": example_mask is not None,
        "ignore_index": None if ignore_index is None else int(ignore_index),
    }
    call = _logits_call(layout, batch_shape, num_classes, opts, cmask_kind, cdtype)
    nondiff = _NonDiffInputs(labels, example_mask, weights, class_mask)
    loss, _, _, denw = _logits_loss(call, z, nondiff)
    return reduce_loss(loss, reduction, denominator_weights=denw)


def is_explicitly_sharded(logits: ArrayLike) -> bool:
    """Whether ``logits`` carry an explicit sharding (mesh axes of type ``Explicit``) along any
    dimension; such logits go to
    :func:`vocab_parallel_softmax_cross_entropy_with_integer_labels`, which keeps every block of
    classes on its device (a plain ``take_along_axis`` over a sharded class axis is refused by
    JAX's sharding-in-types)."""
    logits = jnp.asarray(logits)
    if logits.ndim == 0:
        return False
    sharding = _sharding_of(logits)
    if sharding is None or not _explicit_axes(getattr(sharding, "mesh", None)):
        return False
    spec = _padded_spec(sharding, logits.ndim)
    return any(axes_of(e) for e in spec)
