"""The fused distillation loss on 8 simulated CPU devices; run by ``tests/test_distillation.py``
in a child process (JAX fixes its device count when it starts):

    XLA_FLAGS=--xla_force_host_platform_device_count=8 python -m tests.distill_child

Prints one JSON object: for every case the relative error of the value and the gradients
(x, w) against the single-device call, and the collectives of the compiled program.
"""

from __future__ import annotations

import json
import os
import sys

# N x V (the logits) is far larger than D x V (the weight gradient) and N x D (the input
# gradient), so a collective of N x V / 8 elements or more can only be (a block of) logits.
N, D, DT, V = 256, 8, 12, 512
IGNORE = -100


def _rel(a, b) -> float:
    """max |a - b| / max |b|; inf if NaN / inf positions differ."""
    import numpy as np

    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    finite = np.isfinite(b)
    if not np.array_equal(finite, np.isfinite(a)):
        return float("inf")
    scale = float(np.max(np.abs(b[finite]), initial=0.0)) or 1.0
    return float(np.max(np.abs(a[finite] - b[finite]), initial=0.0) / scale)


def _data():
    import numpy as np

    rng = np.random.default_rng(7)
    x = rng.normal(size=(N, D)).astype(np.float32)
    w = (rng.normal(size=(D, V)) * 0.8).astype(np.float32)
    tx = rng.normal(size=(N, DT)).astype(np.float32)
    tw = (rng.normal(size=(DT, V)) * 0.6).astype(np.float32)
    labels = rng.integers(0, V, size=(N,)).astype(np.int32)
    labels[::13] = IGNORE
    return x, w, tx, tw, tx @ tw, labels


def _case(name: str, mesh_kind: str, divergence: str, teacher: str, reduction: str, blocks, out):
    import jax
    import jax.numpy as jnp
    from jax.sharding import AxisType, NamedSharding
    from jax.sharding import PartitionSpec as P

    from tests.sharding_check import collectives
    from xent_jax import linear_distillation_loss

    x, w, tx, tw, tl, labels = _data()
    cot = jnp.linspace(-1.0, 1.0, N)
    opts = {
        "divergence": divergence,
        "beta": 0.3 if divergence == "js" else None,
        "temperature": 1.5,
        "labels": labels,
        "ignore_index": IGNORE,
        "reduction": reduction,
        "block_size_tokens": blocks[0],
        "block_size_vocab": blocks[1],
    }

    def loss(x, w, tx, tw, tl, **kw):
        given = (
            {"teacher_logits": tl} if teacher == "logits" else {"teacher_x": tx, "teacher_w": tw}
        )
        value = linear_distillation_loss(x, w, **given, **opts, **kw)
        return jnp.sum(value * cot) if reduction == "none" else value

    def run(args, **kw):
        fn = jax.jit(jax.value_and_grad(lambda *a: loss(*a, **kw), argnums=(0, 1)))
        compiled = fn.lower(*args).compile()
        return compiled(*args), compiled

    single, _ = run((x, w, tx, tw, tl))
    if mesh_kind == "explicit":
        mesh = jax.make_mesh((2, 4), ("data", "vocab"), axis_types=(AxisType.Explicit,) * 2)
        put = lambda a, spec: jax.device_put(a, NamedSharding(mesh, spec))
        args = (
            put(x, P("data", None)),
            put(w, P(None, "vocab")),
            put(tx, P("data", None)),
            put(tw, P(None, "vocab")),
            put(tl, P("data", "vocab")),
        )
        extra = {}
    else:  # mesh= argument, plain arrays
        mesh = jax.make_mesh((8,), ("model",), axis_types=(AxisType.Auto,))
        args = (x, w, tx, tw, tl)
        extra = {"mesh": mesh, "vocab_axis": "model"}
    sharded, compiled = run(args, **extra)
    got, want = jax.tree.leaves(sharded), jax.tree.leaves(single)
    out["cases"][name] = {
        "max_rel_err": max(_rel(a, b) for a, b in zip(got, want, strict=True)),
        "value": float(want[0]),
        "collectives": collectives(compiled.as_text()),
    }


CASES = {
    "explicit/kl/logits/mean": ("explicit", "kl", "logits", "mean", (None, None)),
    "explicit/js/hidden/mean": ("explicit", "js", "hidden", "mean", (None, None)),
    "explicit/js/logits/none/tiles": ("explicit", "js", "logits", "none", (48, 40)),
    "explicit/kl/hidden/sum/tiles": ("explicit", "kl", "hidden", "sum", (100, 72)),
    "mesh_arg/kl/logits/mean": ("mesh_arg", "kl", "logits", "mean", (None, None)),
    "mesh_arg/reverse_kl/hidden/none/tiles": ("mesh_arg", "reverse_kl", "hidden", "none", (64, 80)),
}


def main() -> None:
    import jax

    out = {"device_count": jax.device_count(), "shape": [N, D, V], "cases": {}}
    for name, spec in CASES.items():
        _case(name, *spec, out)
    print(json.dumps(out))


if __name__ == "__main__":
    if "--xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
        sys.exit("run with XLA_FLAGS=--xla_force_host_platform_device_count=8")
    main()
