"""The loops over blocks and tiles: the statistics pass and the gradient pass of the *tiles*
schedule, and the single pass of the *strip* schedule (see the package docstring)."""

from __future__ import annotations

import jax.numpy as jnp
from jax import lax

from xent_jax._fused._blocks import (
    Plan,
    fori,
    put_block,
    take_block,
    w_tile,
    x_block,
    xt_block,
    xt_view,
)
from xent_jax._fused._tile_math import (
    BlockedInputs,
    Stats,
    combine_stats,
    finish_rows,
    init_stats,
    tile_grad,
    tile_logits,
    tile_mask,
    update_stats,
)


def stats_pass(plan: Plan, inputs: BlockedInputs) -> Stats:
    """Forward pass over all tiles (vocabulary outer, tokens inner): final per-token stats."""
    x4, w4 = inputs.x4, inputs.w4
    assert x4 is not None and w4 is not None  # _local._prepare sets both for every pass
    single_i, single_j = plan.kn == 1, plan.kv == 1

    def vocab_step(j, stats):
        w_j = w_tile(plan, w4, j)
        tile_classes = take_block(inputs.cls, j, single_j)
        tile_class_weights = take_block(inputs.cw, j, single_j)

        def token_step(i, stats):
            x_i = x_block(plan, x4, i)
            mask = tile_mask(plan, inputs, i, j)
            _, masked_logits = tile_logits(plan, inputs, x_i, w_j, j, mask)
            labels = take_block(inputs.labels, i, single_i)
            rows = tuple(take_block(field, i, single_i) for field in stats)
            rows = update_stats(plan, rows, masked_logits, labels, tile_classes, tile_class_weights)
            return Stats(
                *(put_block(field, r, i, single_i) for field, r in zip(stats, rows, strict=True))
            )

        return fori(plan.kn, token_step, stats)

    stats = fori(plan.kv, vocab_step, init_stats(plan))
    return combine_stats(plan, stats)


def grad_pass(
    plan: Plan,
    inputs: BlockedInputs,
    lse,
    prob_coef,
    label_coef,
    smooth_coef,
    need_dx: bool,
    need_dw: bool,
):
    """Backward pass: recomputes every tile once; returns (dx4, dw4, db3) in compute dtype.

    The coefficients are ``[kn, bn]`` with the cotangent already folded in.
    """
    x4, w4 = inputs.x4, inputs.w4
    assert x4 is not None and w4 is not None  # _local._prepare sets both for every pass
    single_i, single_j = plan.kn == 1, plan.kv == 1
    d = x4.shape[-1]
    dx4 = jnp.zeros(x4.shape, plan.cdtype) if need_dx else None
    dw4 = jnp.zeros(w4.shape, plan.cdtype) if need_dw else None
    has_bias = inputs.bias is not None
    db3 = jnp.zeros((plan.pv, plan.kv, plan.tc), plan.cdtype) if has_bias else None
    xt4 = xt_view(x4) if need_dw else None

    def vocab_step(j, carry):
        dx4, dw4, db3 = carry
        w_j = w_tile(plan, w4, j)
        w_j_compute = w_j.astype(plan.cdtype)
        tile_classes = take_block(inputs.cls, j, single_j)
        tile_class_weights = take_block(inputs.cw, j, single_j)
        dw_j = jnp.zeros((d, plan.bv), plan.cdtype) if need_dw else None
        db_j = jnp.zeros((plan.bv,), plan.cdtype) if db3 is not None else None

        def token_step(i, carry):
            dx4, dw_j, db_j = carry
            x_i = x_block(plan, x4, i)
            mask = tile_mask(plan, inputs, i, j)
            logits, masked_logits = tile_logits(plan, inputs, x_i, w_j, j, mask)
            labels = take_block(inputs.labels, i, single_i)
            coefs = [take_block(t, i, single_i) for t in (lse, prob_coef, label_coef, smooth_coef)]
            lse_i, prob_i, label_i, smooth_i = coefs
            du = tile_grad(
                plan,
                logits,
                masked_logits,
                mask,
                lse_i,
                prob_i,
                label_i,
                smooth_i,
                labels,
                tile_classes,
                tile_class_weights,
            )
            if dx4 is not None:
                dx_i = jnp.dot(
                    du, w_j_compute.T, preferred_element_type=plan.cdtype, precision=plan.precision
                )
                dx_i = dx_i.reshape(plan.pn, 1, plan.bc, d)
                if single_i:
                    dx4 = dx4 + dx_i
                else:
                    old = lax.dynamic_slice_in_dim(dx4, i, 1, axis=1)
                    dx4 = lax.dynamic_update_slice_in_dim(dx4, old + dx_i, i, axis=1)
            if dw_j is not None:
                assert xt4 is not None  # made whenever need_dw
                xt_i = xt_block(plan, xt4, i).astype(plan.cdtype)
                dw_j = dw_j + jnp.dot(
                    xt_i, du, preferred_element_type=plan.cdtype, precision=plan.precision
                )
            if db_j is not None:
                db_j = db_j + jnp.sum(du, axis=0)
            return dx4, dw_j, db_j

        dx4, dw_j, db_j = fori(plan.kn, token_step, (dx4, dw_j, db_j))
        if dw4 is not None:
            dw_j = dw_j.reshape(d, plan.pv, 1, plan.tc)
            dw4 = dw_j if single_j else lax.dynamic_update_slice_in_dim(dw4, dw_j, j, axis=2)
        if db3 is not None:
            db_j = db_j.reshape(plan.pv, 1, plan.tc)
            db3 = db_j if single_j else lax.dynamic_update_slice_in_dim(db3, db_j, j, axis=1)
        return dx4, dw4, db3

    return fori(plan.kv, vocab_step, (dx4, dw4, db3))


def strip_pass(plan: Plan, inputs: BlockedInputs, row_scale, need_dx: bool, need_dw: bool):
    """One pass over token blocks, each against the whole vocabulary (``kv == 1``): statistics,
    per-token loss and the gradient of ``sum(row_scale * loss)`` in the same visit."""
    assert plan.kv == 1
    single_i = plan.kn == 1
    x4, w4 = inputs.x4, inputs.w4
    assert x4 is not None and w4 is not None  # _local._prepare sets both for every pass
    d = x4.shape[-1]
    w_all = w_tile(plan, w4, 0)
    w_all_compute = w_all.astype(plan.cdtype)
    classes = inputs.cls[0]
    class_weights = None if inputs.cw is None else inputs.cw[0]
    dx4 = jnp.zeros(x4.shape, plan.cdtype) if need_dx else None
    dw = jnp.zeros((d, plan.bv), plan.cdtype) if need_dw else None
    db = jnp.zeros((plan.bv,), plan.cdtype) if inputs.bias is not None else None
    xt4 = xt_view(x4) if need_dw else None
    shape = (plan.kn, plan.bn)
    out = (
        jnp.zeros(shape, plan.cdtype),  # loss
        jnp.zeros(shape, plan.cdtype),  # lse
        jnp.zeros(shape, jnp.bool_),  # valid
        jnp.zeros(shape, jnp.int32),  # argmax
        jnp.zeros(shape, plan.cdtype),  # entropy (aux)
        jnp.zeros(shape, plan.cdtype),  # label log-probability (aux)
    )
    dummy = jnp.zeros((plan.bn,), plan.cdtype)

    def token_step(i, carry):
        dx4, dw, db, out = carry
        x_i = x_block(plan, x4, i)
        mask = tile_mask(plan, inputs, i, 0)
        logits, masked_logits = tile_logits(plan, inputs, x_i, w_all, 0, mask)
        labels = take_block(inputs.labels, i, single_i)
        fresh = (
            jnp.full((plan.bn,), -jnp.inf, plan.cdtype),
            dummy,
            dummy,
            dummy,
            dummy,
            dummy,
            jnp.full((plan.bn,), -jnp.inf, plan.cdtype),
            jnp.zeros((plan.bn,), jnp.int32),
            dummy,
        )
        stats = Stats(*update_stats(plan, fresh, masked_logits, labels, classes, class_weights))
        stats = combine_stats(plan, stats)
        block_inputs = inputs._replace(
            labels=labels,
            keep=take_block(inputs.keep, i, single_i),
            invalid=take_block(inputs.invalid, i, single_i),
            wy=take_block(inputs.wy, i, single_i),
            tw=take_block(inputs.tw, i, single_i),
        )
        rows = finish_rows(plan, block_inputs, stats)
        scale = jnp.where(rows.grad_ok, take_block(row_scale, i, single_i), 0)
        du = tile_grad(
            plan,
            logits,
            masked_logits,
            mask,
            rows.lse,
            scale * rows.prob_coef,
            scale * rows.label_coef,
            scale * rows.smooth_coef,
            labels,
            classes,
            class_weights,
        )
        if dx4 is not None:
            dx_i = jnp.dot(
                du, w_all_compute.T, preferred_element_type=plan.cdtype, precision=plan.precision
            )
            dx_i = dx_i.reshape(plan.pn, 1, plan.bc, d)
            dx4 = dx_i if single_i else lax.dynamic_update_slice_in_dim(dx4, dx_i, i, axis=1)
        if dw is not None:
            assert xt4 is not None  # made whenever need_dw
            xt_i = xt_block(plan, xt4, i).astype(plan.cdtype)
            dw = dw + jnp.dot(
                xt_i, du, preferred_element_type=plan.cdtype, precision=plan.precision
            )
        if db is not None:
            db = db + jnp.sum(du, axis=0)
        new = (rows.loss, rows.lse, rows.valid, stats.arg, rows.entropy, rows.label_logprob)
        out = tuple(put_block(o, r, i, single_i) for o, r in zip(out, new, strict=True))
        return dx4, dw, db, out

    dx4, dw, db, out = fori(plan.kn, token_step, (dx4, dw, db, out))
    dw4 = None if dw is None else dw.reshape(d, plan.pv, 1, plan.tc)
    db3 = None if db is None else db.reshape(plan.pv, 1, plan.tc)
    return out, (dx4, dw4, db3)
