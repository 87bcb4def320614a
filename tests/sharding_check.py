"""Sharded cross-entropy on 8 simulated CPU devices; run by ``tests/test_sharding.py`` in a child
process (JAX fixes its device count when it starts, so the flag must be set before import):

    XLA_FLAGS=--xla_force_host_platform_device_count=8 python -m tests.sharding_check

Prints one JSON object: for every case the relative error of values and gradients against the
single-device result, the collectives of the compiled program (kind and element counts of their
results), and the per-device memory of vocab- and data-parallel calls on 1, 2, 4 and 8 devices.
"""

from __future__ import annotations

import json
import os
import re
import sys

# Shapes: N x V (the logits) is far larger than D x V (the weight gradient) and N x D (the input
# gradient), so a collective of N x V / 8 elements or more can only be (a block of) the logits.
N, D, V = 512, 16, 1024
IGNORE = -100
_COLLECTIVE = re.compile(
    r"\b(all-gather|all-reduce|all-to-all|collective-permute|reduce-scatter|ragged-all-to-all)"
    r"(?:-start)?\("
)


def collectives(hlo_text: str) -> list[tuple[str, list[int]]]:
    """(kind, element counts of each result) of every collective in compiled HLO text."""
    found = []
    for line in hlo_text.splitlines():
        match = _COLLECTIVE.search(line)
        if not match or "=" not in line:
            continue
        lhs = line.split("=", 1)[1][: match.start() - line.index("=") - 1]
        sizes = []
        for dims in re.findall(r"[a-z]+[0-9]*\[([0-9,]*)\]", lhs):
            count = 1
            for d in filter(None, dims.split(",")):
                count *= int(d)
            sizes.append(count)
        found.append((match.group(1), sizes))
    return found


def _rel(a, b) -> float:
    """max |a - b| / max |b| over finite entries; inf if NaN / inf positions differ."""
    import numpy as np

    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    finite = np.isfinite(b)
    if not np.array_equal(finite, np.isfinite(a)):
        return float("inf")
    if not finite.any():
        return 0.0
    scale = float(np.max(np.abs(b[finite]))) or 1.0
    return float(np.max(np.abs(a[finite] - b[finite])) / scale)


def _padded(spec, ndim: int) -> tuple:
    return tuple(spec) + (None,) * (ndim - len(tuple(spec)))


def _data():
    import numpy as np

    rng = np.random.default_rng(0)
    x = rng.normal(size=(N, D)).astype(np.float32)
    w = (rng.normal(size=(D, V)) / np.sqrt(D) * 3).astype(np.float32)
    b = rng.normal(size=(V,)).astype(np.float32)
    y = rng.integers(0, V, size=(N,)).astype(np.int32)
    y[::17] = IGNORE
    cw = rng.uniform(0.3, 2.0, V).astype(np.float32)
    mask = rng.random(V) < 0.9
    mask[np.maximum(y, 0)] = True
    return x, w, b, y, cw, mask


OPTIONS = {
    "plain": {},
    "all": {
        "ignore_index": IGNORE,
        "label_smoothing": 0.1,
        "z_loss": 1e-3,
        "logit_softcap": 5.0,
    },
}


def _fused_case(mesh_kind: str, layout: str, reduction: str, options: str, results: dict):
    import jax
    import jax.numpy as jnp
    from jax.sharding import AxisType, NamedSharding
    from jax.sharding import PartitionSpec as P

    from xent_jax import linear_softmax_cross_entropy_with_integer_labels as fused

    x, w, b, y, cw, mask = _data()
    opts = dict(OPTIONS[options])
    if options == "all":
        opts |= {"class_weights": cw, "where": mask[None, :]}
    cot = jnp.linspace(-1.0, 1.0, N)
    explicit_args = mesh_kind == "explicit_args"
    types = AxisType.Auto if mesh_kind in ("auto", "explicit_args") else AxisType.Explicit
    if layout == "2d":
        mesh = jax.make_mesh((2, 4), ("data", "vocab"), axis_types=(types, types))
        sx, sw = P("data"), P(None, "vocab")
    else:
        mesh = jax.make_mesh((8,), ("d",), axis_types=(types,))
        sx, sw = (P(), P(None, "d")) if layout == "vocab" else (P("d"), P())
    extra = {}
    if explicit_args:
        extra = {
            "mesh": mesh,
            "vocab_axis": sw[1] if len(sw) > 1 else None,
            "batch_axis": sx[0] if len(sx) else None,
        }

    def loss(x, w, b, y, **kw):
        out = fused(x, w, y, bias=b, reduction=reduction, **opts, **kw)
        return (out * cot).sum() if reduction == "none" else out

    def run(args, **kw):
        fn = jax.jit(jax.value_and_grad(lambda *a: loss(*a, **kw), argnums=(0, 1, 2)))
        compiled = fn.lower(*args).compile()
        return compiled(*args), compiled

    single, _ = run((x, w, b, y))
    vocab_entry = sw[1] if len(sw) > 1 else None
    sb = P(vocab_entry)
    put = lambda a, spec: jax.device_put(a, NamedSharding(mesh, spec))
    args = (put(x, sx), put(w, sw), put(b, sb), put(y, P(*sx)))
    sharded, compiled = run(args, **extra)
    leaves = jax.tree.leaves(sharded)
    errors = [_rel(a, e) for a, e in zip(leaves, jax.tree.leaves(single), strict=True)]
    name = f"fused/{mesh_kind}/{layout}/{reduction}/{options}"
    results["cases"][name] = {
        "max_rel_err": max(errors),
        "collectives": collectives(compiled.as_text()),
        "output_shardings_ok": _padded(leaves[2].sharding.spec, 2) == _padded(sw, 2),
    }


def _logits_case(mesh_kind: str, layout: str, results: dict):
    import jax
    from jax.sharding import AxisType, NamedSharding
    from jax.sharding import PartitionSpec as P

    import xent_jax
    from xent_jax import vocab_parallel_softmax_cross_entropy_with_integer_labels

    x, w, b, y, cw, mask = _data()
    logits = x @ w + b
    opts = dict(OPTIONS["all"], class_weights=cw, where=mask[None, :], reduction="mean")
    types = AxisType.Auto if mesh_kind == "auto" else AxisType.Explicit
    mesh = jax.make_mesh((8,), ("d",), axis_types=(types,))
    spec = P(None, "d") if layout == "classes" else P("d", None)

    def core(z, y):
        return xent_jax.softmax_cross_entropy_with_integer_labels(z, y, **opts)

    want = jax.jit(jax.value_and_grad(core))(logits, y)
    args = (
        jax.device_put(logits, NamedSharding(mesh, spec)),
        jax.device_put(y, NamedSharding(mesh, P(spec[0]))),
    )
    fns = {"core": core}
    if mesh_kind == "explicit":
        fns["direct"] = lambda z, y: vocab_parallel_softmax_cross_entropy_with_integer_labels(
            z, y, **opts
        )
    else:
        fns["direct"] = lambda z, y: vocab_parallel_softmax_cross_entropy_with_integer_labels(
            z, y, mesh=mesh, vocab_axis=spec[1], batch_axis=spec[0], **opts
        )
    for fn_name, fn in fns.items():
        name = f"logits/{mesh_kind}/{layout}/{fn_name}"
        try:
            compiled = jax.jit(jax.value_and_grad(fn)).lower(*args).compile()
            got = compiled(*args)
        except Exception as err:  # reported, asserted by the test
            results["cases"][name] = {"error": f"{type(err).__name__}: {str(err)[:300]}"}
            continue
        errors = [_rel(a, e) for a, e in zip(got, want, strict=True)]
        results["cases"][name] = {
            "max_rel_err": max(errors),
            "collectives": collectives(compiled.as_text()),
        }


def _memory(results: dict):
    """Per-device bytes of the compiled loss + gradients on 1, 2, 4 and 8 devices."""
    import jax
    import jax.numpy as jnp
    from jax.sharding import AxisType, NamedSharding
    from jax.sharding import PartitionSpec as P

    from xent_jax import linear_softmax_cross_entropy_with_integer_labels as fused

    n, d, v = 2048, 64, 16384
    memory = {}
    for mesh_kind in ("explicit", "auto"):
        types = AxisType.Explicit if mesh_kind == "explicit" else AxisType.Auto
        for layout in ("vocab", "data"):
            rows = []
            for count in (1, 2, 4, 8):
                mesh = jax.make_mesh(
                    (count,), ("d",), axis_types=(types,), devices=jax.devices()[:count]
                )
                sx, sw = (P(), P(None, "d")) if layout == "vocab" else (P("d"), P())
                spec = lambda shape, dtype, s, mesh=mesh: jax.ShapeDtypeStruct(
                    shape, dtype, sharding=NamedSharding(mesh, s)
                )
                args = (
                    spec((n, d), jnp.float32, sx),
                    spec((d, v), jnp.float32, sw),
                    spec((n,), jnp.int32, P(*sx)),
                )
                fn = jax.jit(
                    jax.value_and_grad(
                        lambda x, w, y: fused(x, w, y, reduction="mean"), argnums=(0, 1)
                    )
                )
                stats = fn.lower(*args).compile().memory_analysis()
                rows.append(
                    {
                        "devices": count,
                        "temp_bytes": int(stats.temp_size_in_bytes),
                        "argument_bytes": int(stats.argument_size_in_bytes),
                        "output_bytes": int(stats.output_size_in_bytes),
                    }
                )
            memory[f"{mesh_kind}/{layout}"] = rows
    results["memory"] = memory
    results["memory_shape"] = {"N": n, "D": d, "V": v}


def main() -> dict:
    import jax

    results: dict = {"device_count": jax.device_count(), "shape": [N, D, V], "cases": {}}
    for mesh_kind in ("explicit", "auto"):
        for layout in ("vocab", "data", "2d"):
            for reduction in ("none", "mean"):
                _fused_case(mesh_kind, layout, reduction, "all", results)
    _fused_case("explicit", "vocab", "sum", "plain", results)
    _fused_case("explicit_args", "vocab", "mean", "all", results)
    _fused_case("explicit_args", "2d", "none", "plain", results)
    for mesh_kind in ("explicit", "auto"):
        for layout in ("classes", "batch"):
            _logits_case(mesh_kind, layout, results)
    _memory(results)
    return results


if __name__ == "__main__":
    if "--xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
        sys.exit("set XLA_FLAGS=--xla_force_host_platform_device_count=8 before running")
    print(json.dumps(main()))
