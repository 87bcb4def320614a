"""``shard_map`` wrapping and the custom VJPs of the fused loss.

Two custom VJPs share the per-device entry points of :mod:`xent_jax._fused._local`:

* ``rows_loss`` (tiles schedule): the forward pass returns the per-token loss and saves the
  per-token logsumexp and VJP coefficients; the backward pass recomputes every tile.
* ``reduced_loss`` (strip schedule, ``"sum"`` / ``"mean"``): the forward pass of the VJP
  computes the loss and its gradients in one pass; the backward pass only scales them by the
  cotangent. Without differentiation only the loss is computed.

On a mesh each runs inside :func:`jax.shard_map`; without one it is a plain call.
"""

from __future__ import annotations

import functools
from typing import Any, Protocol

import jax
import jax.numpy as jnp
from jax.custom_derivatives import CustomVJPPrimal, SymbolicZero
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from xent_jax._fused._local import (
    Call,
    NonDiffInputs,
    local_backward,
    local_forward,
    local_reduced_fwd,
    local_reduced_primal,
)
from xent_jax._mesh import spec_entry


def partition_specs(call: Call, nondiff: NonDiffInputs[jax.Array]) -> dict:
    """``PartitionSpec`` of every kind of argument and result of the local entry points."""
    vocab = spec_entry(call.vocab_axes)
    batch = tuple(call.batch_spec)
    if nondiff.class_mask is None:
        class_mask_spec = None
    elif call.plan.cmask == "shared":
        class_mask_spec = P(None, vocab)
    else:
        class_mask_spec = P(*batch, vocab)
    nondiff_specs = NonDiffInputs(
        labels=P(*batch),
        example_mask=None if nondiff.example_mask is None else P(*batch),
        class_weights=None if nondiff.class_weights is None else P(vocab),
        class_mask=class_mask_spec,
        label_smoothing=None if nondiff.label_smoothing is None else P(),
        z_loss=None if nondiff.z_loss is None else P(),
        token_weights=None if nondiff.token_weights is None else P(*batch),
    )
    return {
        "x": P(*batch, None),
        "w": P(None, vocab),
        "bias": P(vocab),
        "rows": P(*batch),
        "scalar": P(),
        "nondiff": nondiff_specs,
    }


def _bias_spec(specs: dict, bias):
    """The bias's spec, or ``None`` when there is no bias."""
    return None if bias is None else specs["bias"]


def _operand_specs(specs: dict, bias) -> tuple:
    """in_specs of ``(x, w, bias, nondiff)``, the leading arguments of every entry point."""
    return (specs["x"], specs["w"], _bias_spec(specs, bias), specs["nondiff"])


def _grad_specs(specs: dict, bias) -> tuple:
    """out_specs of the gradients ``(dx, dw, db)``."""
    return (specs["x"], specs["w"], _bias_spec(specs, bias))


def _reduced_specs(specs: dict) -> tuple:
    """out_specs of the reduced loss and the six per-token outputs (see :func:`reduced_loss`)."""
    return (specs["scalar"],) + (specs["rows"],) * 6


class _OnMesh(Protocol):
    """What :func:`shard_mapped` reads of its ``call``: a :class:`Call` or a distillation plan."""

    @property
    def mesh(self) -> Any: ...


def shard_mapped(call: _OnMesh, local_fn, in_specs, out_specs):
    """``local_fn(call, ...)`` run on every device of ``call.mesh`` (a plain call without one)."""
    if call.mesh is None:
        return functools.partial(local_fn, call)
    mapped = jax.shard_map(
        functools.partial(local_fn, call),
        mesh=call.mesh,
        in_specs=in_specs,
        out_specs=out_specs,
        check_vma=False,
    )
    explicit = jax.sharding.AxisType.Explicit
    if explicit not in tuple(getattr(call.mesh, "axis_types", ())):
        return mapped  # automatic axes: shard_map reshards its inputs itself

    def run(*args):
        # Explicit axes: inputs must already carry the shardings shard_map expects.
        args = jax.tree.map(
            lambda array, spec: _reshard(call.mesh, array, spec),
            args,
            tuple(in_specs),
            is_leaf=lambda t: t is None,
        )
        return mapped(*args)

    return run


def _reshard(mesh, array, spec):
    """``array`` with the sharding ``spec`` on ``mesh`` (unchanged if it already has it)."""
    if array is None:
        return None
    array = jnp.asarray(array)
    current = getattr(jax.typeof(array).sharding, "spec", None)
    padded = lambda s: tuple(s) + (None,) * (array.ndim - len(s))
    if current is not None and padded(current) == padded(spec):
        return array
    return jax.reshard(array, NamedSharding(mesh, spec))


def _forward_rows(call: Call, x, w, bias, nondiff: NonDiffInputs[jax.Array]):
    """The 10 per-token outputs of :func:`local_forward`, over the mesh."""
    specs = partition_specs(call, nondiff)
    fn = shard_mapped(call, local_forward, _operand_specs(specs, bias), (specs["rows"],) * 10)
    return fn(x, w, bias, nondiff)


def _aux_coefficients(valid, label_logprob, d_lse, d_logprob):
    """(probability, label) gradient coefficients from cotangents of the per-token logsumexp
    (``dlse/dz = p``) and label log-probability (``dlog p_y/dz = e_y - p``); rows that do not
    count (masked, ignored, invalid labels) pass nothing back."""
    live = valid & ~jnp.isnan(label_logprob)
    d_lse = jnp.where(live, d_lse, 0)
    d_logprob = jnp.where(live, d_logprob, 0)
    return d_lse - d_logprob, -d_logprob


def _add_grads(t: jax.Array | None, e: jax.Array | None) -> jax.Array | None:
    """``t + e``, or ``None`` for an argument without a gradient (no bias)."""
    if t is None:
        return None
    assert e is not None  # both come from the same arguments: None in the same places
    return t + e


def _recompute_grads(call: Call, x, w, bias, nondiff, lse, prob_coef, label_coef, smooth_coef):
    """Gradients from per-token coefficients (cotangents folded in): every tile recomputed."""
    specs = partition_specs(call, nondiff)
    fn = shard_mapped(
        call,
        local_backward,
        _operand_specs(specs, bias) + (specs["rows"],) * 5,
        _grad_specs(specs, bias),
    )
    return fn(x, w, bias, nondiff, lse, prob_coef, label_coef, smooth_coef, jnp.ones_like(lse))


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def rows_loss(call: Call, x, w, bias, nondiff: NonDiffInputs[jax.Array]):
    """Per-token (loss, lse, argmax, valid, denominator weights, entropy, label log-probability);
    tiles schedule."""
    return _forward_rows(call, x, w, bias, nondiff)[:7]


def _rows_loss_fwd(call: Call, x, w, bias, nondiff: NonDiffInputs[jax.Array]):
    """Forward pass of :func:`rows_loss`: saves the logsumexp and the VJP coefficients."""
    out = _forward_rows(call, x, w, bias, nondiff)
    lse, valid, label_logprob = out[1], out[3], out[6]
    residuals = (x, w, bias, nondiff, lse, valid, label_logprob, *out[7:])
    return out[:7], residuals


def _rows_loss_bwd(call: Call, residuals, cotangents):
    """Backward pass of :func:`rows_loss`: recomputes every tile. The loss, the logsumexp and
    the label log-probability have gradients; argmax, validity, weights and entropy do not."""
    x, w, bias, nondiff, lse, valid, label_logprob, prob_coef, label_coef, smooth_coef = residuals
    g, d_lse, d_logprob = cotangents[0], cotangents[1], cotangents[6]
    aux_prob, aux_label = _aux_coefficients(valid, label_logprob, d_lse, d_logprob)
    coefs = (g * prob_coef + aux_prob, g * label_coef + aux_label, g * smooth_coef)
    dx, dw, db = _recompute_grads(call, x, w, bias, nondiff, lse, *coefs)
    return dx, dw, db, None


rows_loss.defvjp(_rows_loss_fwd, _rows_loss_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def reduced_loss(call: Call, x, w, bias, nondiff: NonDiffInputs[jax.Array]):
    """(reduced loss, and per token: lse, argmax, valid, denominator weights, entropy, label
    log-probability); strip schedule, loss only when not differentiated."""
    specs = partition_specs(call, nondiff)
    fn = shard_mapped(
        call, local_reduced_primal, _operand_specs(specs, bias), _reduced_specs(specs)
    )
    return fn(x, w, bias, nondiff)


def _reduced_loss_fwd(call: Call, x, w, bias, nondiff: NonDiffInputs[jax.Array]):
    """Forward pass of :func:`reduced_loss`: the loss and its gradients in one pass."""
    x, w, bias, nondiff = jax.tree.map(
        lambda p: p.value, (x, w, bias, nondiff), is_leaf=lambda t: isinstance(t, CustomVJPPrimal)
    )
    specs = partition_specs(call, nondiff)
    out_specs = (_reduced_specs(specs), _grad_specs(specs, bias))
    fn = shard_mapped(call, local_reduced_fwd, _operand_specs(specs, bias), out_specs)
    out, grads = fn(x, w, bias, nondiff)
    lse, valid, label_logprob = out[1], out[3], out[6]
    return out, (grads, x, w, bias, nondiff, lse, valid, label_logprob)


def _reduced_loss_bwd(call: Call, residuals, cotangents):
    """Backward pass of :func:`reduced_loss`: the saved gradients times the cotangent, plus,
    only when the logsumexp or the label log-probability is differentiated too, one pass that
    recomputes the tiles for their gradients."""
    grads, x, w, bias, nondiff, lse, valid, label_logprob = residuals
    g, d_lse, d_logprob = cotangents[0], cotangents[1], cotangents[6]
    zero = lambda t: isinstance(t, SymbolicZero)
    if zero(g):
        grads = tuple(None if t is None else jnp.zeros_like(t) for t in grads)
    else:
        grads = tuple(None if t is None else (g * t).astype(t.dtype) for t in grads)
    if not (zero(d_lse) and zero(d_logprob)):
        d_lse = jnp.zeros_like(lse) if zero(d_lse) else d_lse
        d_logprob = jnp.zeros_like(lse) if zero(d_logprob) else d_logprob
        aux_prob, aux_label = _aux_coefficients(valid, label_logprob, d_lse, d_logprob)
        extra = _recompute_grads(
            call, x, w, bias, nondiff, lse, aux_prob, aux_label, jnp.zeros_like(lse)
        )
        grads = tuple(_add_grads(t, e) for t, e in zip(grads, extra, strict=True))
    return (*grads, None)


reduced_loss.defvjp(_reduced_loss_fwd, _reduced_loss_bwd, symbolic_zeros=True)
