"""Benchmark groups (loss x dtype x shape), their inputs and every implementation of each loss.

A *group* holds everything that is timed together, interleaved: every implementation in both
modes (``fwd``: the mean loss; ``fwd_bwd``: the gradient of the mean loss with respect to the
logits, or to ``x`` and ``w`` for the fused linear loss) and the reference kernels that measure
the limits on the same array (``(copy)``, ``(read)``, ``(exp)``, ``(matmul)``).
"""

from __future__ import annotations

import functools
import math
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

import xent_jax
from research.bench import ffi_kernel

LOSSES = ("softmax_int", "softmax_dense", "sigmoid", "linear_softmax_int")
MODES = ("fwd", "fwd_bwd")
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
IMPLEMENTATIONS = (
    "xent_jax",
    "xent_jax[options]",
    "xent_jax[unfused]",
    "xent_jax[ignore_index]",  # fused loss with ignore_index set, no row ignored
    "xent_jax[half-ignored]",  # the same call with half the rows' labels = ignore_index
    "optax",
    "jnp",
    "jnp[no-shift]",  # a reference point, not a loss: see _no_shift_softmax_int
    "ffi[no-shift]",  # the same with a C++ gradient kernel: see research/bench/ffi_kernel.py
    "ffi",  # both passes from C++ kernels (reference points, float32 on CPU)
    "ffi[options]",
    "ffi[hinted]",  # statistics around the label logit, as xent_jax's CPU fast path
    "ffi[hinted+options]",
    "torch",
)
LOSS_TITLES = {
    "softmax_int": "softmax CE, integer labels",
    "softmax_dense": "softmax CE, dense labels",
    "sigmoid": "sigmoid BCE",
    "linear_softmax_int": "fused linear + softmax CE, integer labels",
}


def parse_shape(text: str) -> tuple[int, ...]:
    """``"8192x32768"`` -> ``(8192, 32768)``; ``"N x D x V"`` for the fused linear loss."""
    try:
        shape = tuple(int(part) for part in str(text).lower().split("x"))
    except ValueError:
        raise ValueError(f"bad shape {text!r}: write it as NxK (or NxDxV)") from None
    if not shape or min(shape) < 1:
        raise ValueError(f"bad shape {text!r}: sizes must be positive")
    return shape


def shape_text(shape: tuple[int, ...]) -> str:
    return "x".join(str(s) for s in shape)


@dataclass(frozen=True)
class Group:
    """One loss at one dtype and shape: ``(N, K)`` logits, or ``(N, D, V)`` for the fused loss."""

    loss: str
    dtype: str
    shape: tuple[int, ...]

    @property
    def linear(self) -> bool:
        return self.loss == "linear_softmax_int"

    @property
    def batch(self) -> int:
        return self.shape[0]

    @property
    def classes(self) -> int:
        return self.shape[-1]

    @property
    def elements(self) -> int:
        """Number of logits (``N * K``; ``N * V`` for the fused loss)."""
        return self.batch * self.classes

    @property
    def itemsize(self) -> int:
        return jnp.dtype(DTYPES[self.dtype]).itemsize

    @property
    def label(self) -> str:
        return f"{self.loss}/{self.dtype}/{shape_text(self.shape)}"

    def read_bytes(self) -> int:
        """Bytes one call must read: the logits (or ``x`` and ``w``) once, and the labels."""
        if self.linear:
            n, d, v = self.shape
            return (n * d + d * v) * self.itemsize + n * 4
        labels = self.batch * 4 if self.loss == "softmax_int" else self.elements * self.itemsize
        return self.elements * self.itemsize + labels

    def write_bytes(self, mode: str) -> int:
        """Bytes one call must write: the gradient once (``fwd``: nothing but a scalar)."""
        if mode == "fwd":
            return 0
        if self.linear:
            n, d, v = self.shape
            return (n * d + d * v) * self.itemsize
        return self.elements * self.itemsize

    def flops(self, mode: str) -> int:
        """Matmul FLOPs of the fused loss: ``2NDV`` forward, ``6NDV`` forward + backward."""
        if not self.linear:
            return 0
        n, d, v = self.shape
        return (2 if mode == "fwd" else 6) * n * d * v

    def working_set_bytes(self, num_inputs: int, with_torch: bool) -> int:
        """A generous estimate of the memory the group needs at once."""
        inputs = self.read_bytes() * num_inputs * (2 if with_torch else 1)
        logits = self.elements * 4
        return inputs + 4 * logits


def num_inputs(group: Group, rotation_bytes: int, max_inputs: int) -> int:
    """Enough distinct input sets that rotating through them does not time the cache."""
    return int(min(max(2, math.ceil(rotation_bytes / max(group.read_bytes(), 1))), max_inputs))


def make_inputs(group: Group, count: int, seed: int) -> list[tuple[jax.Array, ...]]:
    """``count`` independent input tuples on the default device."""
    dtype = DTYPES[group.dtype]
    key = jax.random.PRNGKey(seed)
    inputs = []
    for _ in range(count):
        key, k1, k2, k3 = jax.random.split(key, 4)
        n, k = group.batch, group.classes
        if group.linear:
            d = group.shape[1]
            x = jax.random.normal(k1, (n, d), jnp.float32).astype(dtype)
            # Logits x @ w of unit-ish scale, as in a trained language model head.
            w = (jax.random.normal(k3, (d, k), jnp.float32) * (2.0 / math.sqrt(d))).astype(dtype)
            y = jax.random.randint(k2, (n,), 0, k, jnp.int32)
            inputs.append((x, w, y))
            continue
        z = (2.0 * jax.random.normal(k1, (n, k), jnp.float32)).astype(dtype)
        if group.loss == "softmax_int":
            second = jax.random.randint(k2, (n,), 0, k, jnp.int32)
        elif group.loss == "softmax_dense":
            second = jax.nn.softmax(2.0 * jax.random.normal(k2, (n, k), jnp.float32)).astype(dtype)
        else:
            second = jax.random.bernoulli(k2, 0.5, (n, k)).astype(dtype)
        inputs.append((z, second))
    return jax.block_until_ready(inputs)


# --------------------------------------------------------------------------------------------
# JAX implementations: each returns the scalar mean loss of the group's inputs.
# --------------------------------------------------------------------------------------------


def _logits(x, w):
    return jnp.dot(x, w, preferred_element_type=jnp.float32)


def _jnp_softmax_int(z, y):
    log_probs = jax.nn.log_softmax(z, axis=-1)
    return -jnp.mean(jnp.take_along_axis(log_probs, y[:, None], axis=-1))


@jax.custom_jvp
def _unshifted_logsumexp(z):
    # No max shift and no fallback: +inf / NaN for float32 logits beyond about +-88.
    return jnp.log(jnp.sum(jnp.exp(z.astype(jnp.float32)), axis=-1))


@_unshifted_logsumexp.defjvp
def _unshifted_logsumexp_jvp(primals, tangents):
    (z,), (dz,) = primals, tangents
    lse = _unshifted_logsumexp(z)
    probs = jnp.exp(z.astype(jnp.float32) - lse[..., None])
    return lse, jnp.sum(probs * dz.astype(jnp.float32), axis=-1)


def _no_shift_softmax_int(z, y):
    """The least work XLA can be asked for: one ``exp`` pass forward, and under ``jax.grad`` one
    fused chain (sum, log, gradient) that XLA:CPU compiles into a single row-wise kernel.

    A reference point for the speed bars, not a loss to train with: without the row maximum and
    without xent_jax's careful fallback it is wrong (+inf, NaN) as soon as a logit leaves the
    float32 ``exp`` range. It shows how much of xent_jax's time its fallback costs.
    """
    label_logits = jnp.take_along_axis(z, y[:, None], axis=-1)[:, 0].astype(jnp.float32)
    return jnp.mean(_unshifted_logsumexp(z) - label_logits)


def _jnp_sigmoid(z, t):
    # The textbook stable form: max(z, 0) - z t + log(1 + exp(-|z|)).
    return jnp.mean(jnp.maximum(z, 0) - z * t + jnp.log1p(jnp.exp(-jnp.abs(z))))


def jax_loss(
    loss: str, impl: str, options: dict[str, Any], *, in_place: bool = False
) -> Callable | None:
    """The mean loss as a function of the group's inputs, or None if ``impl`` has no such loss.

    ``in_place``: the caller donates the logits (only the C++ kernels need to be told).
    """
    fused = xent_jax.linear_softmax_cross_entropy_with_integer_labels
    ignore_index = options.get("ignore_index", -100)
    table: dict[tuple[str, str], Callable] = {
        ("softmax_int", "xent_jax"): lambda z, y: (
            xent_jax.softmax_cross_entropy_with_integer_labels(z, y, reduction="mean")
        ),
        ("softmax_int", "xent_jax[options]"): (
            lambda z, y: xent_jax.softmax_cross_entropy_with_integer_labels(
                z, y, reduction="mean", **options
            )
        ),
        ("softmax_int", "optax"): lambda z, y: jnp.mean(
            optax.softmax_cross_entropy_with_integer_labels(z, y)
        ),
        ("softmax_int", "jnp"): _jnp_softmax_int,
        ("softmax_int", "jnp[no-shift]"): _no_shift_softmax_int,
        ("softmax_dense", "xent_jax"): lambda z, t: xent_jax.softmax_cross_entropy(
            z, t, reduction="mean"
        ),
        ("softmax_dense", "optax"): lambda z, t: jnp.mean(optax.softmax_cross_entropy(z, t)),
        ("softmax_dense", "jnp"): lambda z, t: (
            -jnp.mean(jnp.sum(t * jax.nn.log_softmax(z, axis=-1), axis=-1))
        ),
        ("sigmoid", "xent_jax"): lambda z, t: xent_jax.sigmoid_binary_cross_entropy(
            z, t, reduction="mean"
        ),
        ("sigmoid", "optax"): lambda z, t: jnp.mean(optax.sigmoid_binary_cross_entropy(z, t)),
        ("sigmoid", "jnp"): _jnp_sigmoid,
        ("linear_softmax_int", "xent_jax[unfused]"): (
            lambda x, w, y: xent_jax.softmax_cross_entropy_with_integer_labels(
                _logits(x, w), y, reduction="mean"
            )
        ),
        ("linear_softmax_int", "optax"): lambda x, w, y: jnp.mean(
            optax.softmax_cross_entropy_with_integer_labels(_logits(x, w), y)
        ),
        ("linear_softmax_int", "jnp"): lambda x, w, y: _jnp_softmax_int(_logits(x, w), y),
    }
    if impl.startswith("ffi") and ffi_kernel.available():
        no_shift = ffi_kernel.make_no_shift_loss(_unshifted_logsumexp, in_place=in_place)
        table[("softmax_int", "ffi[no-shift]")] = no_shift
        table[("softmax_int", "ffi")] = ffi_kernel.make_loss(in_place=in_place)
        table[("softmax_int", "ffi[options]")] = ffi_kernel.make_loss(**options, in_place=in_place)
        hinted = functools.partial(ffi_kernel.make_loss, in_place=in_place, hinted=True)
        table[("softmax_int", "ffi[hinted]")] = hinted()
        table[("softmax_int", "ffi[hinted+options]")] = hinted(**options)
    table[("linear_softmax_int", "xent_jax")] = lambda x, w, y: fused(x, w, y, reduction="mean")
    for variant in ("xent_jax[ignore_index]", "xent_jax[half-ignored]"):
        # One call for both: they differ only in their labels (see half_ignored_inputs).
        table[("linear_softmax_int", variant)] = lambda x, w, y: fused(
            x, w, y, reduction="mean", ignore_index=ignore_index
        )
    return table.get((loss, impl))


def supports(group: Group, impl: str) -> bool:
    """Whether ``impl`` runs on the group's dtype (the C++ kernels are float32 only)."""
    return not impl.startswith("ffi") or group.dtype == "float32"


def jax_function(
    group: Group, impl: str, mode: str, options: dict[str, Any], *, in_place: bool = False
) -> Callable | None:
    """The timed function: the mean loss (``fwd``) or its gradient (``fwd_bwd``); for the fused
    linear loss the loss and its gradients with respect to ``x`` and ``w``, as a training step
    needs them."""
    loss = jax_loss(group.loss, impl, options, in_place=in_place)
    if loss is None or mode == "fwd":
        return loss
    if group.linear:
        return jax.value_and_grad(loss, argnums=(0, 1))
    return jax.grad(loss)


def half_ignored_inputs(
    inputs: list[tuple[jax.Array, ...]], ignore_index: int, seed: int
) -> list[tuple[jax.Array, ...]]:
    """The fused loss's input sets with the labels of half the rows (a random half, the same in
    every set) set to ``ignore_index``: a batch of which half is padding."""
    n = inputs[0][2].shape[0]
    rows = np.random.default_rng(seed).permutation(n)[: n // 2]
    ignored = np.zeros(n, bool)
    ignored[rows] = True
    mask = jnp.asarray(ignored)
    out = [(x, w, jnp.where(mask, jnp.int32(ignore_index), y)) for x, w, y in inputs]
    return jax.block_until_ready(out)


def reference_kernels(group: Group, backend: str) -> dict[str, Callable]:
    """Kernels that measure the limits on the group's own arrays (first input argument)."""
    if group.linear:
        return {"(matmul)": lambda x, w, y: _logits(x, w)}
    kernels = {
        # Read the logits, write a fresh array of the same size and dtype: what a gradient costs.
        "(copy)": lambda z, second: z * 1.5 + 0.5,
        # Read the logits once (a row sum, like the max pass of a log-sum-exp).
        "(read)": lambda z, second: jnp.sum(z, axis=-1),
    }
    if backend == "cpu":
        # One exp per logit, summed per row: the work of one log-sum-exp pass on CPU.
        kernels["(exp)"] = lambda z, second: jnp.sum(jnp.exp(z.astype(jnp.float32)), axis=-1)
    return kernels


# --------------------------------------------------------------------------------------------
# PyTorch (optional).
# --------------------------------------------------------------------------------------------


def torch_module():
    try:
        import torch
    except ImportError:
        return None
    return torch


def torch_version() -> str | None:
    torch = torch_module()
    return None if torch is None else torch.__version__


def torch_device() -> str:
    """``"cuda"`` when JAX runs on a GPU and PyTorch sees one too, else ``"cpu"``: PyTorch is timed
    on the device the JAX implementations run on."""
    torch = torch_module()
    if torch is not None and jax.default_backend() == "gpu" and torch.cuda.is_available():
        return "cuda"
    return "cpu"


def torch_inputs(group: Group, inputs: list[tuple[jax.Array, ...]], mode: str) -> list[tuple]:
    """The same numbers as torch tensors on ``torch_device()`` (the differentiated ones require
    grad)."""
    torch = torch_module()
    device = torch_device()
    tdtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[group.dtype]
    converted = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for item in inputs:
            out = []
            for j, array in enumerate(item):
                if jnp.issubdtype(array.dtype, jnp.integer):
                    out.append(torch.from_numpy(np.asarray(array).astype(np.int64)).to(device))
                    continue
                tensor = torch.from_numpy(np.array(array.astype(jnp.float32))).to(device, tdtype)
                differentiated = j in ((0, 1) if group.linear else (0,))
                out.append(tensor.requires_grad_(mode == "fwd_bwd" and differentiated))
            converted.append(tuple(out))
    return converted


def torch_function(group: Group, mode: str) -> Callable | None:
    torch = torch_module()
    if torch is None:
        return None
    functional = torch.nn.functional
    losses = {
        "softmax_int": lambda z, y: functional.cross_entropy(z, y),
        "softmax_dense": lambda z, t: functional.cross_entropy(z, t),
        "sigmoid": lambda z, t: functional.binary_cross_entropy_with_logits(z, t),
        "linear_softmax_int": lambda x, w, y: functional.cross_entropy(
            (x @ w).to(torch.float32), y
        ),
    }
    loss = losses[group.loss]
    if mode == "fwd":

        def forward(*args):
            with torch.no_grad():
                return loss(*args)

        return forward

    def forward_backward(*args):
        wrt = [a for a in args if a.requires_grad]
        return torch.autograd.grad(loss(*args), wrt)

    return forward_backward


def torch_synchronize() -> Callable[[], Any]:
    """Waits for PyTorch's queued CUDA kernels (as ``block_until_ready`` does for JAX)."""
    if torch_device() == "cuda":
        return torch_module().cuda.synchronize
    return lambda: None
