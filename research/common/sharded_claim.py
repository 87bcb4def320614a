"""Vocab-sharded against single-device values and gradients, in a process of its own.

``research.headline_claims`` starts this module as a child process with
``XLA_FLAGS=--xla_force_host_platform_device_count=<devices>`` (JAX fixes its device count when
it starts, so the parent, with its one device, cannot measure it) and passes the settings as
JSON in the environment variable ``XENT_JAX_SHARDED_CLAIM``:

    {"shape": [N, D, V], "seed": 0}

It prints one JSON object: the device count it saw and, for the fused linear loss (``w`` split
along the vocabulary) and the plain loss on logits split along the classes, the relative error
of the loss and of each gradient against the same call on one device.
"""

from __future__ import annotations

import json
import os
from typing import Any

import numpy as np

SETTINGS_VARIABLE = "XENT_JAX_SHARDED_CLAIM"
IGNORE_INDEX = -100
OPTIONS = {"ignore_index": IGNORE_INDEX, "label_smoothing": 0.1, "z_loss": 1e-4}


def relative_error(got: Any, want: Any) -> float:
    """``max |got - want| / max |want|``, in float64."""
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    return float(np.max(np.abs(got - want)) / max(float(np.max(np.abs(want))), 1e-30))


def measure(shape: tuple[int, int, int], seed: int) -> dict[str, Any]:
    """The fused and the logits cases on a mesh over every device, against one device."""
    import jax
    from jax.sharding import AxisType, NamedSharding
    from jax.sharding import PartitionSpec as P

    import xent_jax

    n, d, v = shape
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, d)).astype(np.float32)
    w = (rng.normal(size=(d, v)) * (2.0 / np.sqrt(d))).astype(np.float32)
    y = rng.integers(0, v, size=n).astype(np.int32)
    y[::7] = IGNORE_INDEX
    count = jax.device_count()
    mesh = jax.make_mesh((count,), ("vocab",), axis_types=(AxisType.Explicit,))
    put = lambda array, spec: jax.device_put(array, NamedSharding(mesh, spec))

    def fused(x, w, y):
        return xent_jax.linear_softmax_cross_entropy_with_integer_labels(
            x, w, y, reduction="mean", **OPTIONS
        )

    def plain(logits, y):
        return xent_jax.softmax_cross_entropy_with_integer_labels(
            logits, y, reduction="mean", **OPTIONS
        )

    fused_grad = jax.jit(jax.value_and_grad(fused, argnums=(0, 1)))
    single = fused_grad(x, w, y)
    sharded = fused_grad(put(x, P()), put(w, P(None, "vocab")), put(y, P()))
    names = ("loss", "grad_x", "grad_w")
    results: dict[str, Any] = {"device_count": count, "shape": [n, d, v]}
    results["fused"] = {
        name: relative_error(a, b)
        for name, a, b in zip(names, jax.tree.leaves(sharded), jax.tree.leaves(single), strict=True)
    }
    logits = x @ w
    plain_grad = jax.jit(jax.value_and_grad(plain))
    single = plain_grad(logits, y)
    sharded = plain_grad(put(logits, P(None, "vocab")), put(y, P()))
    results["logits"] = {
        name: relative_error(a, b)
        for name, a, b in zip(("loss", "grad_logits"), sharded, single, strict=True)
    }
    return results


if __name__ == "__main__":
    settings = json.loads(os.environ[SETTINGS_VARIABLE])
    print(json.dumps(measure(tuple(settings["shape"]), int(settings["seed"]))))
