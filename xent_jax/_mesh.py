"""How a call's arrays are laid out on a :class:`jax.sharding.Mesh`.

Two ways in, with the same results as on one device:

* Plain ``jax.jit`` on arrays with a ``NamedSharding``. On a mesh with explicit axes (the
  default of :func:`jax.make_mesh`) the shardings are part of the arrays' types, so the losses
  read them at trace time (:func:`resolve_layout`) and run their blocks inside
  :func:`jax.shard_map`. On a mesh with automatic axes the shardings are not visible at trace
  time; the blocked losses then lay out their blocks so that XLA's partitioner splits every
  block evenly over the devices (``Layout.auto_factor``).
* An explicit ``mesh=`` with ``vocab_axis=`` / ``batch_axis=``, checked here
  (:func:`resolve_layout`) with messages that name the argument.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import jax


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


def spec_entry(axes: tuple[str, ...]):
    """Mesh axes as one ``PartitionSpec`` entry (``None``, a name, or a tuple of names)."""
    if not axes:
        return None
    return axes[0] if len(axes) == 1 else tuple(axes)


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


def _check_axis_names(name: str, value) -> tuple[str, ...]:
    """``vocab_axis`` / ``batch_axis``: ``None``, a mesh axis name or a tuple of names."""
    axes = axes_of(value)
    if not all(isinstance(a, str) for a in axes):
        raise TypeError(
            f"{name} must be a mesh axis name, a tuple of names or None, got {value!r}."
        )
    return axes


def _checked_mesh(mesh):
    """The ``mesh=`` argument, or the current mesh; a clear error for anything else."""
    if mesh is None:
        mesh = jax.sharding.get_abstract_mesh()
        if not getattr(mesh, "axis_names", ()):
            raise ValueError(
                "vocab_axis / batch_axis need a mesh: pass mesh=jax.make_mesh(...) or call "
                "under `with jax.set_mesh(mesh):`."
            )
        return mesh
    if not isinstance(mesh, jax.sharding.Mesh | jax.sharding.AbstractMesh):
        raise TypeError(
            "mesh must be a jax.sharding.Mesh (e.g. jax.make_mesh((4,), ('model',))), got "
            f"{type(mesh).__name__}: {mesh!r:.80}."
        )
    return mesh


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

    Explicit arguments win (and are checked: a mesh, axis names of that mesh, no axis used
    for both tokens and classes); otherwise the shardings in the arrays' types (explicit mesh
    axes) are used. The last dimension of ``batched`` is its feature / class dimension.
    """
    nbatch = batched.ndim - 1
    if mesh is not None or vocab_axis is not None or batch_axis is not None:
        mesh = _checked_mesh(mesh)
        vocab_axes = _check_axis_names("vocab_axis", vocab_axis)
        data_axes = _check_axis_names("batch_axis", batch_axis)
        if batch_axis is not None and not nbatch:
            raise ValueError("batch_axis needs inputs with a batch dimension.")
        for name, axes in (("vocab_axis", vocab_axes), ("batch_axis", data_axes)):
            for a in axes:
                if a not in mesh.axis_names:
                    raise ValueError(
                        f"{name}={a!r} is not an axis of the mesh (its axes: {mesh.axis_names})."
                    )
        shared = set(vocab_axes) & set(data_axes)
        if shared:
            raise ValueError(
                "vocab_axis and batch_axis must be different mesh axes; both name "
                f"{sorted(shared)}."
            )
        batch_spec = (batch_axis,) + (None,) * (nbatch - 1) if nbatch else ()
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


def vocab_padding(layout: Layout, num_classes: int) -> int:
    """Classes to add so that the mesh axes the vocabulary is split over divide it (50257
    classes over 4 devices: 3). Explicitly sharded arrays are always divisible (JAX refuses
    uneven explicit shardings); this is for ``mesh=`` / ``vocab_axis=`` on plain arrays."""
    if layout.mesh is None:
        return 0
    return -num_classes % axes_size(layout.mesh, layout.vocab_axes)


def local_sizes(layout: Layout, batch_shape: tuple[int, ...], num_classes: int):
    """(local batch shape, local tokens, local classes) of one device under ``layout``."""
    if layout.mesh is None:
        return batch_shape, math.prod(batch_shape), num_classes
    local = []
    for dim, entry in zip(batch_shape, layout.batch_spec, strict=True):
        size = axes_size(layout.mesh, axes_of(entry))
        if dim % size:
            raise ValueError(
                f"a batch dimension of size {dim} is split over mesh axes {axes_of(entry)} of "
                f"size {size}, which does not divide it."
            )
        local.append(dim // size)
    vsize = axes_size(layout.mesh, layout.vocab_axes)
    if num_classes % vsize:
        raise ValueError(
            f"K={num_classes} classes are split over mesh axes {layout.vocab_axes} of size "
            f"{vsize}, which does not divide it."
        )
    return tuple(local), math.prod(local), num_classes // vsize


def is_explicitly_sharded(array: jax.Array) -> bool:
    """Whether ``array`` carries an explicit sharding (mesh axes of type ``Explicit``) along any
    dimension; such logits go to the vocab-parallel loss, which keeps every block of classes on
    its device (a plain ``take_along_axis`` over a sharded class axis is refused by JAX's
    sharding-in-types)."""
    if array.ndim == 0:
        return False
    sharding = _sharding_of(array)
    if sharding is None or not _explicit_axes(getattr(sharding, "mesh", None)):
        return False
    spec = _padded_spec(sharding, array.ndim)
    return any(axes_of(e) for e in spec)
