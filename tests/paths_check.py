"""The option table of ``tests/test_paths.py`` and the child process that runs it through every
path of the softmax cross-entropy engine on 4 simulated CPU devices:

    XLA_FLAGS=--xla_force_host_platform_device_count=4 python -m tests.paths_check

JAX fixes its device count when it starts, so the sharded paths need a process of their own; one
child runs the whole table and prints one JSON object, which ``tests/test_paths.py`` asserts.

The paths (integer labels ``y``, logits ``z`` of shape ``[N, K]``):

* ``plain``: ``softmax_cross_entropy_with_integer_labels(z, y, ...)``, the reference of the others;
* ``plain_sharded``: the same call on ``z`` laid out along the classes over an explicit mesh;
* ``vocab_parallel``: ``vocab_parallel_softmax_cross_entropy_with_integer_labels(z, y, ...,
  mesh=, vocab_axis=)`` on the same sharded ``z``;
* ``fused``: ``linear_softmax_cross_entropy_with_integer_labels(z, I, y, ...)``: ``z @ I == z``;
* ``fused_sharded``: the same with the identity split along the vocabulary;
* ``analytic``: ``xent_jax.analytic.softmax_cross_entropy_with_integer_labels_grad`` (gradients);
* ``dense``: ``softmax_cross_entropy`` given the one-hot targets (ignored examples masked).

Adding an option means adding one :data:`ROWS` entry.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
import time
from collections.abc import Callable

import numpy as np

N, K = 6, 8
DEVICES = 4
IGNORE = -100
REDUCTIONS = ("none", "sum", "mean")
PATHS = (
    "plain",
    "plain_sharded",
    "vocab_parallel",
    "fused",
    "fused_sharded",
    "analytic",
    "dense",
)
SHARDED = frozenset({"plain_sharded", "vocab_parallel", "fused_sharded"})
# Paths that promise forward mode (jvp, jacfwd) and so jax.hessian. The fused loss and the
# explicit vocab-parallel loss are custom VJPs: forward mode there either works or fails with an
# error that names the loss that has it (checked by tests/test_paths.py).
FORWARD_MODE = frozenset({"plain", "plain_sharded", "dense"})
WITHOUT_AXIS = frozenset({"fused", "fused_sharded"})  # x @ w puts the classes last
# Options the dense path translates (an ignored example becomes a masked one) instead of passing.
DENSE_TRANSLATED = frozenset({"ignore_index"})

# ---------------------------------------------------------------------------------------------
# The data every row draws from (float64; cast to the case's dtype).
# ---------------------------------------------------------------------------------------------

_rng = np.random.default_rng(15)
LOGITS = _rng.normal(scale=2.0, size=(N, K))
TANGENT = _rng.normal(size=(N, K))
CLASS_WEIGHTS = _rng.uniform(0.5, 2.0, K)
EXAMPLE_MASK = np.array([True, False, True, True, True, False])
# Per-row class mask: each row keeps 5 or 6 classes, row 4 none at all (it costs 0 and leaves the
# mean), classes 2 and 5 never masked.
CLASS_MASK = _rng.random((N, K)) < 0.75
CLASS_MASK[:, [2, 5]] = True
CLASS_MASK[4] = False
# One class mask shared by every row (the optax / LM "masked vocabulary" idiom): [1, K].
SHARED_CLASS_MASK = np.ones((1, K), bool)
SHARED_CLASS_MASK[0, [1, 6]] = False
# Labels on classes that no mask removes; class 0 occurs (for ignore_index=0).
_allowed = CLASS_MASK & SHARED_CLASS_MASK
_allowed[4] = SHARED_CLASS_MASK[0]
LABELS = np.argmax(_rng.random((N, K)) * _allowed, axis=-1).astype(np.int32)
LABELS[3] = 0 if _allowed[3, 0] else LABELS[3]
LABELS_IGNORED = LABELS.copy()
LABELS_IGNORED[[1, 4]] = IGNORE


@dataclasses.dataclass(frozen=True, eq=False)
class Row:
    """One option set.

    Attributes:
      name: the row's id in test names.
      options: keyword options of the integer-label loss (``reduction`` excluded: every row runs
        ``"none"``, ``"sum"`` and ``"mean"``).
      labels: ``"given"`` (``LABELS``) or ``"ignored"`` (``LABELS_IGNORED``: two examples carry
        ``IGNORE``).
      axis: the class axis of the logits (``0``: the logits are transposed).
      dtypes: the input dtypes the row runs in.
      traced: option names that the row's traced variant passes as arguments of the jitted
        function (empty: static options only).
      raises: ``(error type, regex the message must match)`` when every path must refuse the row.
      hessian: whether to compare ``jax.hessian`` of the summed loss too.
      reduction: only for rows that must raise: the (invalid) reduction to pass.
    """

    name: str
    options: dict
    labels: str = "given"
    axis: int = -1
    dtypes: tuple[str, ...] = ("float32",)
    traced: tuple[str, ...] = ()
    raises: tuple[type, str] | None = None
    hessian: bool = False
    reduction: str | None = None

    @property
    def label_array(self) -> np.ndarray:
        return LABELS_IGNORED if self.labels == "ignored" else LABELS

    def paths(self) -> tuple[str, ...]:
        """The paths the row applies to: not the fused ones for another class axis, and not
        the dense loss for refusing an option it does not take (the row translates it)."""
        found = tuple(p for p in PATHS if self.axis == -1 or p not in WITHOUT_AXIS)
        if self.raises and DENSE_TRANSLATED & set(self.options):
            found = tuple(p for p in found if p != "dense")
        return found


_ALL = {
    "ignore_index": IGNORE,
    "label_smoothing": 0.1,
    "z_loss": 1e-2,
    "logit_softcap": 5.0,
    "temperature": 1.5,
    "class_weights": CLASS_WEIGHTS,
}
_TRACEABLE = ("label_smoothing", "z_loss", "class_weights", "where")
# Options that select code while tracing: traced, every path refuses them with this error.
STATIC_ONLY = {"logit_softcap": TypeError, "temperature": TypeError, "ignore_index": TypeError}
ROWS: tuple[Row, ...] = (
    # Every option alone.
    Row("defaults", {}, dtypes=("float32", "float64", "bfloat16"), hessian=True),
    Row("ignore_index", {"ignore_index": IGNORE}, labels="ignored"),
    Row("ignore_index_is_a_class", {"ignore_index": 0}),
    Row("label_smoothing", {"label_smoothing": 0.2}, traced=("label_smoothing",)),
    Row("z_loss", {"z_loss": 0.05}, traced=("z_loss",)),
    Row("logit_softcap", {"logit_softcap": 3.0}, traced=("logit_softcap",)),
    Row("temperature", {"temperature": 2.5}, traced=("temperature",)),
    Row("class_weights", {"class_weights": CLASS_WEIGHTS}),
    Row("where_examples", {"where": EXAMPLE_MASK}),
    Row("where_classes", {"where": CLASS_MASK}),
    Row("where_shared_classes", {"where": SHARED_CLASS_MASK}),
    # The combinations people use.
    Row(
        "torch_weight_ignore_smoothing",
        {"ignore_index": IGNORE, "label_smoothing": 0.1, "class_weights": CLASS_WEIGHTS},
        labels="ignored",
        dtypes=("float32", "float64"),
        traced=("label_smoothing", "class_weights"),
    ),
    Row(
        "lm_ignore_z_loss_softcap",
        {"ignore_index": IGNORE, "z_loss": 1e-4, "logit_softcap": 30.0, "label_smoothing": 0.1},
        labels="ignored",
        dtypes=("float32", "bfloat16"),
        traced=("label_smoothing", "z_loss"),
    ),
    Row("all_where_examples", {**_ALL, "where": EXAMPLE_MASK}, labels="ignored"),
    Row(
        "all_where_classes",
        {**_ALL, "where": CLASS_MASK},
        labels="ignored",
        dtypes=("float32", "float64", "bfloat16"),
        traced=_TRACEABLE,
        hessian=True,
    ),
    Row(
        "axis_0_smoothing_weights_class_mask",
        {"label_smoothing": 0.1, "class_weights": CLASS_WEIGHTS, "where": CLASS_MASK},
        axis=0,
    ),
    # Values every path must refuse, with the same error type and a message naming the argument.
    Row("logit_softcap_zero", {"logit_softcap": 0.0}, raises=(ValueError, "logit_softcap")),
    Row("logit_softcap_negative", {"logit_softcap": -1.0}, raises=(ValueError, "logit_softcap")),
    Row("label_smoothing_one", {"label_smoothing": 1.0}, raises=(ValueError, "label_smoothing")),
    Row(
        "label_smoothing_negative",
        {"label_smoothing": -0.1},
        raises=(ValueError, "label_smoothing"),
    ),
    Row("z_loss_negative", {"z_loss": -1.0}, raises=(ValueError, "z_loss")),
    Row("temperature_zero", {"temperature": 0.0}, raises=(ValueError, "temperature")),
    Row(
        "class_weights_of_wrong_length",
        {"class_weights": np.ones(K - 1)},
        raises=(ValueError, "class_weights"),
    ),
    Row("where_of_wrong_shape", {"where": np.ones(N - 1, bool)}, raises=(ValueError, "where")),
    Row("unknown_reduction", {}, reduction="avg", raises=(ValueError, "reduction")),
    Row(
        "ignore_index_not_an_integer", {"ignore_index": -100.5}, raises=(TypeError, "ignore_index")
    ),
)
ROW = {row.name: row for row in ROWS}


@dataclasses.dataclass(frozen=True)
class Case:
    """One row in one dtype, with static options or with ``row.traced`` traced."""

    row: str
    dtype: str
    traced: bool

    @property
    def id(self) -> str:
        return f"{self.row}-{self.dtype}-{'traced' if self.traced else 'static'}"

    @property
    def refused(self) -> tuple[type, str] | None:
        """The error every path must raise for this case (a traced static-only option)."""
        if self.traced:
            for name in ROW[self.row].traced:
                if name in STATIC_ONLY:
                    return STATIC_ONLY[name], name
        return None


def cases() -> list[Case]:
    """Every case the child runs: each valid row in each of its dtypes, static and (when the row
    has traced options) traced in float32."""
    found = []
    for row in ROWS:
        if row.raises:
            continue
        for dtype in row.dtypes:
            found.append(Case(row.name, dtype, False))
            if row.traced and dtype == "float32":
                found.append(Case(row.name, dtype, True))
    return found


def hessian_cases() -> list[Case]:
    return [c for c in cases() if ROW[c.row].hessian and not c.traced and c.dtype != "bfloat16"]


# ---------------------------------------------------------------------------------------------
# The paths, each as loss(z, labels, options, reduction) on the path's own inputs.
# ---------------------------------------------------------------------------------------------


def _paths(mesh) -> dict[str, Callable]:
    import jax
    import jax.numpy as jnp
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    import xent_jax

    def plain(z, y, opts, reduction, axis):
        return xent_jax.softmax_cross_entropy_with_integer_labels(
            z, y, reduction=reduction, **_with_axis(opts, axis)
        )

    def vocab_parallel(z, y, opts, reduction, axis):
        return xent_jax.vocab_parallel_softmax_cross_entropy_with_integer_labels(
            z, y, reduction=reduction, mesh=mesh, vocab_axis="v", **_with_axis(opts, axis)
        )

    def fused_with(w_spec):
        def fused(z, y, opts, reduction, axis):
            eye = jnp.eye(K, dtype=z.dtype)
            if w_spec is not None:
                eye = jax.sharding.reshard(eye, NamedSharding(mesh, w_spec))
            return xent_jax.linear_softmax_cross_entropy_with_integer_labels(
                z, eye, y, reduction=reduction, precision="highest", **opts
            )

        return fused

    def analytic(z, y, opts, reduction, axis):
        return xent_jax.analytic.softmax_cross_entropy_with_integer_labels_grad(
            z, y, reduction=reduction, **_with_axis(opts, axis)
        )

    def dense(z, y, opts, reduction, axis):
        opts = dict(opts)
        ignore_index = opts.pop("ignore_index", None)
        axis = axis % z.ndim
        targets = jnp.moveaxis(jax.nn.one_hot(y, z.shape[axis], dtype=z.dtype), -1, axis)
        where = opts.get("where")
        if ignore_index is not None:
            # An ignored example is a masked one; a class-rank mask masks all of its classes.
            kept = y != ignore_index
            if where is None:
                where = kept
            elif jnp.ndim(where) == z.ndim:
                where = jnp.logical_and(where, jnp.expand_dims(kept, axis))
            else:
                where = jnp.logical_and(where, kept)
            opts["where"] = where
        loss = xent_jax.softmax_cross_entropy(
            z, targets, reduction=reduction, **_with_axis(opts, axis)
        )
        if reduction == "mean" and "class_weights" in opts:
            # The dense-label mean divides by the number of valid examples (PyTorch's
            # probability targets), the integer-label one by their summed label weights.
            valid = jnp.ones(y.shape, bool)
            if where is not None:
                if jnp.ndim(where) == z.ndim:
                    valid = jnp.any(jnp.broadcast_to(where, z.shape), axis=axis)
                else:
                    valid = jnp.broadcast_to(where, y.shape)
            label_weights = jnp.asarray(opts["class_weights"])[jnp.clip(y, 0, K - 1)]
            loss = loss * jnp.sum(valid) / jnp.sum(jnp.where(valid, label_weights, 0))
        return loss

    del P
    return {
        "plain": plain,
        "plain_sharded": plain,
        "vocab_parallel": vocab_parallel,
        "fused": fused_with(None),
        "fused_sharded": fused_with(jax.sharding.PartitionSpec(None, "v")),
        "analytic": analytic,
        "dense": dense,
    }


def _with_axis(opts: dict, axis: int) -> dict:
    return opts if axis == -1 else {**opts, "axis": axis}


def _layout(row: Row, array: np.ndarray) -> np.ndarray:
    """An array of the logits' shape in the row's layout (transposed for ``axis=0``)."""
    return array.T if row.axis == 0 else array


def _row_options(row: Row, dtype) -> dict:
    """The row's options with arrays of the logits' rank in the row's layout; float arrays in
    the case's dtype (class weights stay float32 for half inputs, as a user would pass them)."""
    opts = {}
    for name, value in row.options.items():
        if isinstance(value, np.ndarray):
            if value.ndim == 2 and value.shape[0] in (1, N):
                value = _layout(row, value)
            if value.dtype.kind == "f":
                value = value.astype(np.float32 if dtype == "bfloat16" else dtype)
        opts[name] = value
    return opts


# ---------------------------------------------------------------------------------------------
# Running the table: one compiled program per (path, dtype), split only when it fails.
# ---------------------------------------------------------------------------------------------

# What a group computes: "values" (losses and gradients of every reduction), "forward" (their
# JVPs along TANGENT), "hessian" (of the summed loss, for rows that ask for it).
PARTS = ("values", "forward", "hessian")
# Gradients of "none" (ones cotangent: the gradient of the sum) everywhere, and of "mean" where a
# path differentiates its reduction itself (the fused loss's single pass); elsewhere autodiff
# differentiates the reduction, and the test derives the mean's gradient from that of "none".
# Compile time is what this table spends. The closed forms give every reduction.
REDUCTION_GRADIENTS = frozenset({"fused", "fused_sharded"})
DTYPES = {"float32": np.float32, "float64": np.float64, "bfloat16": "bfloat16"}


def _describe(err: BaseException) -> dict:
    return {"type": type(err).__name__, "message": str(err)[:600]}


def _tolist(x) -> list | float:
    return np.asarray(x, np.float64).tolist()


def _parts_of(path: str, case: Case, parts: tuple[str, ...]) -> tuple[str, ...]:
    """The parts of ``parts`` that apply to ``case`` on ``path``."""
    found = []
    for part in parts:
        if part == "values":
            found.append(part)
        elif path in FORWARD_MODE and part == "forward" and not case.traced:
            found.append(part)
        elif path in FORWARD_MODE and part == "hessian" and case in hessian_cases():
            found.append(part)
    return tuple(found)


def _trace_case(path, fn, case, parts, z, t, traced, errors) -> dict:
    """The outputs of ``parts`` for one case, called while its group is traced; an error raised
    while tracing is recorded in ``errors`` and the other cases go on."""
    import jax
    import jax.numpy as jnp

    row = ROW[case.row]
    y = row.label_array
    opts = {**_row_options(row, case.dtype), **traced}

    def loss(z, reduction):
        return fn(z, y, opts, reduction, row.axis)

    out: dict = {}
    for part in parts:
        try:
            if part == "values" and path == "analytic":
                out["grad"] = {r: loss(z, r) for r in REDUCTIONS}
            elif part == "values":
                out["value"], out["grad"] = {}, {}
                for r in REDUCTIONS:
                    if r == "none" or (r == "mean" and path in REDUCTION_GRADIENTS):
                        value, vjp = jax.vjp(lambda z, r=r: loss(z, r), z)
                        (out["grad"][r],) = vjp(jnp.ones_like(value))
                    else:
                        value = loss(z, r)
                    out["value"][r] = value
            elif part == "forward":
                out["jvp"] = {"none": jax.jvp(lambda z: loss(z, "none"), (z,), (t,))[1]}
            elif part == "hessian":
                out["hessian"] = jax.hessian(lambda z: loss(z, "sum"))(z)
        except Exception as err:  # recorded: tests/test_paths.py asserts it
            errors.setdefault(case.id, {})[part] = _describe(err)
    return out


def _inputs(path: str, dtype_name: str, mesh) -> dict:
    """{axis: (logits, tangent)} in the dtype for both layouts, sharded along the classes on the
    sharded-logits paths."""
    import jax
    import jax.numpy as jnp
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    dtype = jnp.bfloat16 if dtype_name == "bfloat16" else DTYPES[dtype_name]
    found = {}
    for axis, spec in ((-1, P(None, "v")), (0, P("v", None))):
        arrays = [LOGITS.T if axis == 0 else LOGITS, TANGENT.T if axis == 0 else TANGENT]
        arrays = [jnp.asarray(a, dtype) for a in arrays]
        if path in ("plain_sharded", "vocab_parallel"):
            arrays = [jax.device_put(a, NamedSharding(mesh, spec)) for a in arrays]
        found[axis] = tuple(arrays)
    return found


def _run_group(path, fn, group, parts, mesh) -> tuple[dict, dict]:
    """Runs ``parts`` of the cases ``group`` (float64 cases or none) in one compiled program.

    Returns ({case id: outputs}, {case id: {part: error}}). A failure after tracing (while
    lowering, compiling or running) splits the group by part, and the values by case; a forward
    mode or Hessian failure there is the path's (a custom VJP) and is recorded for every case.
    """
    import jax

    errors: dict = {}
    x64 = any(case.dtype == "float64" for case in group)
    with jax.enable_x64(x64):
        inputs = {d: _inputs(path, d, mesh) for d in sorted({case.dtype for case in group})}
        traced = {}
        for case in group:
            if case.traced:
                row = ROW[case.row]
                opts = _row_options(row, case.dtype)
                traced[case.id] = {k: v for k, v in opts.items() if k in row.traced}

        def compute(inputs, traced):
            out = {}
            for case in group:
                z, t = inputs[case.dtype][ROW[case.row].axis]
                case_parts = _parts_of(path, case, parts)
                out[case.id] = _trace_case(
                    path, fn, case, case_parts, z, t, traced.get(case.id, {}), errors
                )
            return out

        try:
            out = jax.jit(compute)(inputs, traced)
            return jax.tree.map(_tolist, out), errors
        except Exception as err:
            failure = _describe(err)
    merged: tuple[dict, dict] = ({}, {})
    if len(parts) > 1:
        runs = [(group, (part,)) for part in parts]
    elif parts == ("values",) and len(group) > 1:
        runs = [([case], parts) for case in group]
    else:
        return {}, {case.id: {parts[0]: failure} for case in group if _parts_of(path, case, parts)}
    for cases_, parts_ in runs:
        out, errs = _run_group(path, fn, cases_, parts_, mesh)
        for case_id, value in out.items():
            merged[0].setdefault(case_id, {}).update(value)
        for case_id, value in errs.items():
            merged[1].setdefault(case_id, {}).update(value)
    return merged


def _forward_probe(path, fn, mesh) -> dict:
    """On a path that does not promise forward mode: ``jax.jvp`` of the defaults row."""
    import jax

    row = ROW["defaults"]
    z, t = _inputs(path, "float32", mesh)[-1]
    try:
        _, tangent_out = jax.jit(
            lambda z, t: jax.jvp(lambda z: fn(z, row.label_array, {}, "none", -1), (z,), (t,))
        )(z, t)
    except Exception as err:  # recorded: tests/test_paths.py asserts it
        return {"error": _describe(err)}
    return {"jvp": _tolist(tangent_out)}


def _refusal(row: Row, path: str, fn, mesh) -> dict:
    """The error ``path`` raises for a row every path must refuse (traced, never compiled)."""
    import jax

    z, _ = _inputs(path, "float32", mesh)[row.axis]
    opts = _row_options(row, "float32")
    try:
        jax.eval_shape(lambda z: fn(z, row.label_array, opts, row.reduction or "none", row.axis), z)
    except Exception as err:  # recorded: tests/test_paths.py asserts it
        return {"error": _describe(err)}
    return {}


def _registry_sweep(mesh) -> dict:
    """Every registered two-argument loss on its first argument laid out along the classes over
    the mesh, against the same call on one device: {name: {"sharded" / "single": outputs}}."""
    import jax
    import jax.numpy as jnp
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    from tests import registry

    names = registry.select()
    rng = np.random.default_rng(11)
    arguments = {name: registry.example_inputs(name, rng, N, K) for name in names}
    results: dict = {name: {} for name in names}

    def run(group: list[str], layout: str) -> None:
        errors: dict = {}

        def compute(firsts):
            out = {}
            for name in group:
                fn, rest = registry.REGISTRY[name].fn, arguments[name][1:]
                try:
                    total = lambda x, fn=fn, rest=rest: jnp.sum(fn(x, *rest))
                    value, grad = jax.value_and_grad(total)(firsts[name])
                    out[name] = {"value": fn(firsts[name], *rest), "grad": grad, "sum": value}
                except Exception as err:  # recorded: tests/test_paths.py asserts it
                    errors[name] = _describe(err)
            return out

        firsts = {name: jnp.asarray(arguments[name][0]) for name in group}
        if layout == "sharded":
            firsts = {
                k: jax.device_put(a, NamedSharding(mesh, P(None, "v"))) for k, a in firsts.items()
            }
        try:
            out = jax.tree.map(_tolist, jax.jit(compute)(firsts))
        except Exception as err:
            if len(group) > 1:
                for name in group:
                    run([name], layout)
                return
            out, errors = {}, {group[0]: _describe(err)}
        for name in group:
            results[name][layout] = {"error": errors[name]} if name in errors else out[name]

    run(names, "single")
    run(names, "sharded")
    return results


def main() -> dict:
    import jax

    mesh = jax.make_mesh((DEVICES,), ("v",), axis_types=(jax.sharding.AxisType.Explicit,))
    results: dict = {"device_count": jax.device_count(), "cases": {}, "forward_probe": {}}
    results["refusals"] = {}
    timings: dict = {}
    set_mesh = getattr(jax, "set_mesh", None) or jax.sharding.set_mesh
    with set_mesh(mesh):
        for path, fn in _paths(mesh).items():
            start = time.perf_counter()
            for x64 in (False, True):
                group = [
                    c
                    for c in cases()
                    if (c.dtype == "float64") == x64 and path in ROW[c.row].paths()
                ]
                out, errors = _run_group(path, fn, group, PARTS, mesh)
                for case in group:
                    entry = dict(out.get(case.id, {}))
                    entry["errors"] = errors.get(case.id, {})
                    results["cases"][f"{case.id}/{path}"] = entry
            if path not in FORWARD_MODE and path != "analytic":
                results["forward_probe"][path] = _forward_probe(path, fn, mesh)
            for row in ROWS:
                if row.raises and path in row.paths():
                    results["refusals"][f"{row.name}/{path}"] = _refusal(row, path, fn, mesh)
            timings[path] = round(time.perf_counter() - start, 2)
        start = time.perf_counter()
        results["registry"] = _registry_sweep(mesh)
        timings["registry"] = round(time.perf_counter() - start, 2)
    results["seconds_per_path"] = timings
    return results


if __name__ == "__main__":
    if "--xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
        sys.exit("set XLA_FLAGS=--xla_force_host_platform_device_count=4 before running")
    print(json.dumps(main()))
