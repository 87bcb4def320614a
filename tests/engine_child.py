"""Child process of ``tests/test_engine.py``: the softmax engine's checks that need several
devices (4 simulated CPU devices, started with ``XLA_FLAGS``), reported as one JSON line.

Each check compares a call on logits sharded along the classes over an explicit mesh with the
same call on one device, or records the error a call raises.
"""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

import xent_jax


def _error(fn) -> str | None:
    try:
        fn()
    except Exception as error:  # the parent asserts on the type and message
        return f"{type(error).__name__}: {error}"
    return None


def _gap(a, b) -> float:
    return float(np.max(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64))))


def main() -> dict:
    jax.config.update("jax_enable_x64", True)  # a child process of its own: nothing leaks
    mesh = jax.make_mesh((4,), ("v",), axis_types=(AxisType.Explicit,))
    rng = np.random.default_rng(0)
    z = jnp.asarray(rng.normal(size=(3, 8)))
    labels = jnp.asarray([1, 5, 7])
    tangent = jnp.asarray(rng.normal(size=(3, 8)))
    loss = xent_jax.softmax_cross_entropy_with_integer_labels
    options = {"label_smoothing": 0.2, "z_loss": 0.1, "logit_softcap": 3.0}
    summed = lambda a, **kw: jnp.sum(loss(a, labels, **kw))
    out: dict = {}
    with jax.set_mesh(mesh):
        sharded = NamedSharding(mesh, P(None, "v"))
        zs = jax.device_put(z, sharded)
        ts = jax.device_put(tangent, sharded)
        # Item 3: forward mode and the Hessian on vocab-sharded logits.
        out["hessian"] = _gap(
            jax.hessian(lambda a: summed(a, **options))(zs),
            jax.hessian(lambda a: summed(a, **options))(z),
        )
        out["jvp"] = _gap(
            jax.jvp(lambda a: summed(a, **options), (zs,), (ts,))[1],
            jax.jvp(lambda a: summed(a, **options), (z,), (tangent,))[1],
        )
        out["grad"] = _gap(
            jax.grad(lambda a: summed(a, **options))(zs),
            jax.grad(lambda a: summed(a, **options))(z),
        )
        # Item 2: a traced label smoothing on sharded logits.
        traced = jax.jit(lambda a, e: summed(a, label_smoothing=e))
        out["traced_smoothing"] = _gap(traced(zs, 0.1), summed(z, label_smoothing=0.1))
        # Item 1: logit_softcap=0 is refused on every path.
        out["softcap_zero"] = {
            "sharded": _error(lambda: summed(zs, logit_softcap=0.0)),
            "vocab_parallel": _error(
                lambda: xent_jax.vocab_parallel_softmax_cross_entropy_with_integer_labels(
                    z, labels, logit_softcap=0.0, mesh=mesh, vocab_axis="v"
                )
            ),
            "plain": _error(lambda: summed(z, logit_softcap=0.0)),
        }
        # Item 11: every integer-label function works on sharded logits.
        focal = xent_jax.softmax_focal_loss_with_integer_labels
        sparse = xent_jax.sparse_categorical_cross_entropy
        out["focal"] = _gap(focal(zs, labels), focal(z, labels))
        out["sparse"] = _gap(sparse(jax.nn.softmax(zs), labels), sparse(jax.nn.softmax(z), labels))
        # Item 12: mesh arguments that are not a mesh, or one axis used twice.
        vocab_parallel = xent_jax.vocab_parallel_softmax_cross_entropy_with_integer_labels
        out["mesh_errors"] = [
            _error(lambda: vocab_parallel(z, labels, mesh=jax.devices(), vocab_axis="v")),
            _error(lambda: vocab_parallel(z, labels, mesh="model", vocab_axis="v")),
            _error(lambda: vocab_parallel(z, labels, mesh=mesh, vocab_axis="v", batch_axis="v")),
        ]
    # Issue 16: a vocabulary that the mesh does not divide (19 classes over 4 devices) is padded
    # inside the loss; padded columns take no probability or smoothing mass.
    x = jnp.asarray(rng.normal(size=(6, 5)))
    w = jnp.asarray(rng.normal(size=(5, 19)))
    y = jnp.asarray([0, 18, 3, 7, 18, 11])
    uneven = {"label_smoothing": 0.1, "z_loss": 0.01, "class_weights": jnp.linspace(0.5, 2, 19)}
    fused = xent_jax.linear_softmax_cross_entropy_with_integer_labels

    auto_mesh = jax.make_mesh((4,), ("v",), axis_types=(AxisType.Auto,))
    sharded_kw = {"mesh": auto_mesh, "vocab_axis": "v"}
    value_and_grads = lambda f: jax.tree.leaves(jax.value_and_grad(f, argnums=(0, 1))(x, w))
    reference = value_and_grads(lambda x, w: fused(x, w, y, reduction="mean", **uneven))
    candidates = {
        "uneven_fused": lambda x, w: fused(x, w, y, reduction="mean", **uneven, **sharded_kw),
        "uneven_vocab_parallel": lambda x, w: vocab_parallel(
            x @ w, y, reduction="mean", **uneven, **sharded_kw
        ),
    }
    for name, candidate in candidates.items():
        pairs = zip(value_and_grads(candidate), reference, strict=True)
        out[name] = max(_gap(a, b) for a, b in pairs)
    return out


if __name__ == "__main__":
    print(json.dumps(main()))
