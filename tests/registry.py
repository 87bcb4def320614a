"""The one registry of xent_jax's public loss functions, for every test that loops over them.

A test module selects the losses it covers with :func:`select` (``select(accepts="where")``,
``select(labels="integer")``, ...) instead of keeping a list of names, so that a new loss, or a
new option of an old one, reaches every test that applies by one entry here. Per-loss *data*
(inputs, option values) stays in the test modules; those that keep a dict keyed by loss name
check it against :func:`select` so that a registered loss cannot be forgotten.

Kinds of arguments:

* ``inputs`` (the first argument): ``"logits"``; ``"probabilities"`` (each entry in [0, 1], or
  unnormalised class probabilities for the Keras-style categorical losses); ``"distribution"``
  (probability vectors along ``axis``, used as given);
* ``labels`` (the second argument): ``"integer"`` (class indices, the shape of the inputs
  without the class axis); ``"dense"`` (a distribution over the class axis); ``"binary"``
  (elementwise targets in [0, 1]); ``"distribution"`` (the second distribution ``q``); ``None``
  (no second argument).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable

import numpy as np

import xent_jax

_SOFTMAX = frozenset(
    {
        "axis",
        "where",
        "label_smoothing",
        "class_weights",
        "z_loss",
        "logit_softcap",
        "temperature",
        "reduction",
    }
)
_INFORMATION = frozenset({"axis", "base", "where"})
_MESH = frozenset({"mesh", "vocab_axis", "batch_axis"})


@dataclasses.dataclass(frozen=True)
class Loss:
    """What a test needs to know about one public loss function.

    Attributes:
      name: the name in ``xent_jax``.
      inputs: kind of the first argument (module docstring).
      labels: kind of the second argument, or ``None``.
      options: the keyword-only options it accepts.
      traceable: the scalar options that may be traced (arguments of a jitted function).
      elementwise: the loss has the shape of its inputs (no class axis is reduced).
      softmax: a softmax over a class axis (the row statistics of ``xent_jax._softmax``).
      forward_mode: promises ``jax.jvp`` / ``jax.jacfwd`` / ``jax.hessian``.
      sharded: promises to work on inputs laid out over an explicit mesh.
      analytic_grad: the name of its closed-form gradient in ``xent_jax.analytic``, if any.
      path: ``"plain"``, or ``"fused"`` / ``"vocab_parallel"`` for the losses with other
        positional arguments (``x, w, labels``) or a mesh; :func:`select` leaves those out
        unless asked.
    """

    name: str
    inputs: str
    labels: str | None
    options: frozenset[str]
    traceable: frozenset[str] = frozenset()
    elementwise: bool = False
    softmax: bool = False
    forward_mode: bool = True
    sharded: bool = True
    analytic_grad: str | None = None
    path: str = "plain"

    @property
    def fn(self) -> Callable:
        return getattr(xent_jax, self.name)

    @property
    def grad_fn(self) -> Callable | None:
        return getattr(xent_jax.analytic, self.analytic_grad) if self.analytic_grad else None

    @property
    def second(self) -> str | None:
        """The name of the second argument (``labels``, ``q`` or none)."""
        if self.labels is None:
            return None
        return "q" if self.labels == "distribution" else "labels"

    @property
    def reduces(self) -> bool:
        return "reduction" in self.options


_LOSSES = (
    Loss("entropy", "distribution", None, _INFORMATION),
    Loss("cross_entropy", "distribution", "distribution", _INFORMATION),
    Loss("kl_divergence", "distribution", "distribution", _INFORMATION),
    Loss("js_divergence", "distribution", "distribution", _INFORMATION),
    Loss("binary_entropy", "probabilities", None, frozenset({"base"}), elementwise=True),
    Loss(
        "softmax_cross_entropy",
        "logits",
        "dense",
        _SOFTMAX,
        traceable=frozenset({"label_smoothing", "z_loss"}),
        softmax=True,
        analytic_grad="softmax_cross_entropy_grad",
    ),
    Loss(
        "softmax_cross_entropy_with_integer_labels",
        "logits",
        "integer",
        _SOFTMAX | {"ignore_index"},
        traceable=frozenset({"label_smoothing", "z_loss"}),
        softmax=True,
        analytic_grad="softmax_cross_entropy_with_integer_labels_grad",
    ),
    Loss(
        "sigmoid_binary_cross_entropy",
        "logits",
        "binary",
        frozenset({"pos_weight", "label_smoothing", "where", "reduction"}),
        traceable=frozenset({"label_smoothing", "pos_weight"}),
        elementwise=True,
        analytic_grad="sigmoid_binary_cross_entropy_grad",
    ),
    Loss(
        "sigmoid_focal_loss",
        "logits",
        "binary",
        frozenset({"alpha", "gamma", "where", "reduction"}),
        traceable=frozenset({"alpha", "gamma"}),
        elementwise=True,
    ),
    Loss(
        "softmax_focal_loss",
        "logits",
        "dense",
        frozenset({"axis", "alpha", "gamma", "where", "reduction"}),
        traceable=frozenset({"alpha", "gamma"}),
        softmax=True,
    ),
    Loss(
        "softmax_focal_loss_with_integer_labels",
        "logits",
        "integer",
        frozenset({"axis", "alpha", "gamma", "where", "ignore_index", "reduction"}),
        traceable=frozenset({"alpha", "gamma"}),
        softmax=True,
    ),
    Loss(
        "poly_loss_cross_entropy",
        "logits",
        "dense",
        frozenset({"epsilon", "axis", "where", "label_smoothing", "reduction"}),
        traceable=frozenset({"epsilon", "label_smoothing"}),
        softmax=True,
    ),
    Loss(
        "binary_cross_entropy",
        "probabilities",
        "binary",
        frozenset({"eps", "label_smoothing", "where", "reduction"}),
        traceable=frozenset({"label_smoothing"}),
        elementwise=True,
    ),
    Loss(
        "categorical_cross_entropy",
        "probabilities",
        "dense",
        frozenset({"axis", "eps", "label_smoothing", "where", "reduction"}),
        traceable=frozenset({"label_smoothing"}),
    ),
    Loss(
        "sparse_categorical_cross_entropy",
        "probabilities",
        "integer",
        frozenset({"axis", "eps", "ignore_index", "where", "reduction"}),
    ),
    Loss(
        "linear_softmax_cross_entropy_with_integer_labels",
        "features",
        "integer",
        (_SOFTMAX - {"axis"})
        | _MESH
        | {
            "bias",
            "ignore_index",
            "return_aux",
            "precision",
            "block_size_tokens",
            "block_size_vocab",
            "normalizer",
            "shift",
        },
        traceable=frozenset({"label_smoothing", "z_loss"}),
        softmax=True,
        forward_mode=False,
        path="fused",
    ),
    Loss(
        "vocab_parallel_softmax_cross_entropy_with_integer_labels",
        "logits",
        "integer",
        _SOFTMAX | _MESH | {"ignore_index"},
        traceable=frozenset({"label_smoothing", "z_loss"}),
        softmax=True,
        forward_mode=False,
        path="vocab_parallel",
    ),
)
REGISTRY: dict[str, Loss] = {loss.name: loss for loss in _LOSSES}

# Values for the scalar options when a test needs one (e.g. passed traced through ``jit``).
SCALAR_OPTION_VALUES = {
    "label_smoothing": 0.15,
    "z_loss": 1e-3,
    "logit_softcap": 4.0,
    "pos_weight": 2.5,
    "alpha": 0.3,
    "gamma": 1.5,
    "epsilon": 1.5,
}


def _one_of(value, wanted) -> bool:
    if wanted is None:
        return True
    if isinstance(wanted, str) or not isinstance(wanted, Iterable):
        return value == wanted
    return value in wanted


def select(
    *,
    inputs: str | Iterable[str] | None = None,
    labels: str | Iterable[str | None] | None = ...,
    accepts: str | Iterable[str] = (),
    elementwise: bool | None = None,
    softmax: bool | None = None,
    reduces: bool | None = None,
    analytic: bool | None = None,
    sharded: bool | None = None,
    paths: Iterable[str] = ("plain",),
) -> list[str]:
    """Names of the registered losses that match every given criterion, in registry order.

    Args:
      inputs: kind (or kinds) of the first argument.
      labels: kind (or kinds) of the second argument; ``None`` for losses without one.
      accepts: option name(s) the loss must accept.
      elementwise: the loss keeps the inputs' shape.
      softmax: a softmax over a class axis.
      reduces: accepts ``reduction``.
      analytic: has a closed-form gradient in ``xent_jax.analytic``.
      sharded: promises to work on explicitly sharded inputs.
      paths: which paths to include (default: the two-argument losses only).
    """
    accepts = {accepts} if isinstance(accepts, str) else set(accepts)
    found = []
    for loss in _LOSSES:
        if loss.path not in paths or not accepts <= loss.options:
            continue
        if not _one_of(loss.inputs, inputs):
            continue
        if labels is not ... and not (
            loss.labels is labels if labels is None else _one_of(loss.labels, labels)
        ):
            continue
        checks = (
            (elementwise, loss.elementwise),
            (softmax, loss.softmax),
            (reduces, loss.reduces),
            (analytic, loss.analytic_grad is not None),
            (sharded, loss.sharded),
        )
        if any(want is not None and want != have for want, have in checks):
            continue
        found.append(loss.name)
    return found


def simplex(rng: np.random.Generator, shape, low: float = 0.05) -> np.ndarray:
    """Float32 probability vectors along the last axis, entries bounded away from 0."""
    p = rng.uniform(low, 1.0, shape)
    return (p / p.sum(-1, keepdims=True)).astype(np.float32)


def example_inputs(name: str, rng: np.random.Generator, batch: int, num_classes: int) -> tuple:
    """Valid float32 positional arguments of loss ``name``: ``batch`` rows of ``num_classes``.

    Logits are normal with scale 2; probabilities uniform in [0.05, 0.95]; distributions and
    dense labels rows of :func:`simplex`; binary labels uniform in [0, 1); integer labels int32
    in ``[0, num_classes)``. Draws from ``rng`` in that order (first argument, then labels).
    """
    loss = REGISTRY[name]
    shape = (batch, num_classes)
    if loss.inputs == "distribution":
        first = simplex(rng, shape)
    elif loss.inputs == "probabilities":
        first = rng.uniform(0.05, 0.95, shape).astype(np.float32)
    else:
        first = rng.normal(scale=2.0, size=shape).astype(np.float32)
    if loss.labels is None:
        return (first,)
    return first, example_labels(name, rng, batch, num_classes)


def example_labels(name: str, rng: np.random.Generator, batch: int, num_classes: int):
    """Valid labels (second argument) of loss ``name`` for ``batch`` rows of ``num_classes``."""
    kind = REGISTRY[name].labels
    if kind == "integer":
        return rng.integers(0, num_classes, batch).astype(np.int32)
    if kind == "binary":
        return rng.random((batch, num_classes)).astype(np.float32)
    return simplex(rng, (batch, num_classes))
