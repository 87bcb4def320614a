"""Softmax cross-entropy from hand-written XLA FFI CPU kernels: benchmark-only reference points.

They answer one question for the CPU speed bars: would a custom kernel move the ratios that
XLA:CPU's code cannot? None is a loss to train with (a ``custom_vjp`` has no forward mode, so
no ``jax.hessian``), and all take float32 logits ``[N, K]``. ``softmax_grad_kernel.cc`` holds
the kernels: the row statistics (``lse`` and label smoothing's class sum in one read of the
logits; max-shifted, or around a hint) and the gradient pass (hand-vectorised ``exp``,
streaming stores, XLA's thread pool).

With ``in_place`` (the benchmark's ``donate_logits``) the gradient kernel writes over the
donated logits, as XLA's own gradient pass does there.

* ``ffi[no-shift]``: ``jnp[no-shift]``'s forward (one unshifted ``exp`` pass, wrong beyond the
  float32 ``exp`` range) with the gradient from the kernel.
* ``ffi`` and ``ffi[options]``: both passes from the kernels (max-shifted, safe at any finite
  offset), the latter with the benchmark's ``ignore_index``, ``label_smoothing`` and ``z_loss``
  at no extra pass over the logits.
* ``ffi[hinted]`` and ``ffi[hinted+options]``: the same with the statistics summed around the
  label logit in one read and no row maximum (the work per element of xent_jax's CPU fast
  path), the max-shifted kernel as the fallback: what a kernel would cost inside xent_jax's own
  fast path.

The kernels are compiled on first use with the C++ compiler on ``PATH`` (``$CXX`` or ``c++``) for
this machine (``-march=native``) against the XLA FFI headers that ship with jaxlib, in a
temporary directory removed once the library is loaded. ``available()`` is False when that
fails (no compiler, not on CPU); the implementations are then skipped.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import shutil
import subprocess
import tempfile
import warnings
from pathlib import Path

import jax
import jax.numpy as jnp

SOURCE = Path(__file__).with_name("softmax_grad_kernel.cc")
STATS_TARGET = "xent_bench_softmax_stats"
GRAD_TARGET = "xent_bench_softmax_grad"
HINTED_TARGET = "xent_bench_softmax_hinted_stats"
FLAGS = ("-O3", "-march=native", "-std=c++17", "-shared", "-fPIC", "-fno-math-errno", "-w")


def compiler() -> str | None:
    return shutil.which(os.environ.get("CXX", "c++"))


def build(directory: str | Path) -> Path:
    """Compiles the kernel into ``directory`` (raises ``RuntimeError`` with the compiler's
    message when it fails)."""
    cxx = compiler()
    if cxx is None:
        raise RuntimeError("no C++ compiler on PATH (set CXX)")
    library = Path(directory) / "softmax_kernels.so"
    command = [cxx, *FLAGS, f"-I{jax.ffi.include_dir()}", str(SOURCE), "-o", str(library)]
    result = subprocess.run(command, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed:\n{result.stderr[-2000:]}")
    return library


def source_digest() -> str:
    """SHA-256 of the kernels' source and flags (recorded with results that use them)."""
    return hashlib.sha256(SOURCE.read_bytes() + " ".join(FLAGS).encode()).hexdigest()


@functools.cache
def available() -> bool:
    """Builds and registers the kernels once per process. False (with a warning) where they
    cannot run: not on CPU, or no C++ compiler. A failing build raises: it is a bug."""
    if jax.default_backend() != "cpu":
        warnings.warn("the ffi reference points run on CPU only: skipped", stacklevel=2)
        return False
    if compiler() is None:
        warnings.warn(
            "no C++ compiler on PATH (set CXX): ffi reference points skipped", stacklevel=2
        )
        return False
    if not _REGISTERED:
        directory = tempfile.mkdtemp(prefix="xent_bench_ffi_")
        try:
            library = ctypes.cdll.LoadLibrary(str(build(directory)))
        finally:
            shutil.rmtree(directory, ignore_errors=True)  # a loaded library outlives its file
        for target in (STATS_TARGET, HINTED_TARGET, GRAD_TARGET):
            handler = jax.ffi.pycapsule(getattr(library, target))
            jax.ffi.register_ffi_target(target, handler, platform="cpu")
        _REGISTERED.append(library)  # registered once per process, even if the cache is cleared
    return True


_REGISTERED: list = []


def softmax_statistics(z: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(``logsumexp(z, -1)``, ``sum_c (lse - z_c)``) by the kernel, in one read of ``z``."""
    row = jax.ShapeDtypeStruct(z.shape[:-1], jnp.float32)
    return tuple(jax.ffi.ffi_call(STATS_TARGET, (row, row))(z))


def hinted_sums(z: jax.Array, hint: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(``sum_c exp(z_c - hint)``, ``sum_c (hint - z_c)``) per row by the kernel, in one read of
    ``z`` and without its maximum."""
    row = jax.ShapeDtypeStruct(z.shape[:-1], jnp.float32)
    return tuple(jax.ffi.ffi_call(HINTED_TARGET, (row, row))(z, hint))


def hinted_sums_usable(total: jax.Array, centred: jax.Array) -> jax.Array:
    """Whether every row's hinted sums are usable: False where a logit lies beyond the float32
    ``exp`` range above the hint (``total`` overflows), or a logit is infinite or NaN."""
    return jnp.all((total <= jnp.finfo(jnp.float32).max) & jnp.isfinite(centred))


def hinted_statistics(z: jax.Array, hint: jax.Array) -> tuple[jax.Array, jax.Array]:
    """The same as ``softmax_statistics`` from ``hinted_sums`` around ``hint`` (a logit of each
    row, the label's): the same work per element as xent_jax's CPU fast path (one read, no
    maximum). The max-shifted kernel where the sums are not usable, under ``lax.cond``. Its
    fast path is wider than xent_jax's, which sums ``exp(z_c)`` unshifted and so falls back
    for logits beyond the ``exp`` range whatever the hint."""
    hint = jnp.where(jnp.isfinite(hint), hint, 0)
    total, centred = hinted_sums(z, hint)
    offset = jnp.log(total)
    # sum_c (lse - z_c) = K (lse - hint) + sum_c (hint - z_c), lse = hint + offset.
    hinted = hint + offset, z.shape[-1] * offset + centred
    usable = hinted_sums_usable(total, centred)
    return jax.lax.cond(usable, lambda: hinted, lambda: softmax_statistics(z))


def softmax_gradient(
    z: jax.Array,
    lse: jax.Array,
    scale: jax.Array,
    offset: jax.Array | None = None,
    *,
    in_place: bool = False,
) -> jax.Array:
    """``exp(z - lse[:, None]) * scale[:, None] + offset[:, None]`` by the kernel.

    ``in_place``: write over ``z`` (each block is read before it is written), for programs that
    donate the logits; without donation XLA would copy ``z`` first.
    """
    offset = jnp.zeros_like(scale) if offset is None else offset
    call = jax.ffi.ffi_call(
        GRAD_TARGET,
        jax.ShapeDtypeStruct(z.shape, jnp.float32),
        input_output_aliases={0: 0} if in_place else None,
    )
    return call(z, lse, scale, offset)


def make_no_shift_loss(logsumexp, *, in_place: bool = False):
    """``ffi[no-shift]``: the mean integer-label softmax cross-entropy, with ``jnp[no-shift]``'s
    ``logsumexp`` as its forward."""

    @jax.custom_vjp
    def loss(z, y):
        return forward(z, y)[0]

    def forward(z, y):
        lse = logsumexp(z)
        label_logits = jnp.take_along_axis(z, y[:, None], axis=-1)[:, 0]
        return jnp.mean(lse - label_logits), (z, y, lse)

    def backward(residuals, ct):
        z, y, lse = residuals
        scale = jnp.full(lse.shape, ct / z.shape[0], jnp.float32)
        grad = softmax_gradient(z, lse, scale, in_place=in_place)
        # The one-hot term: a scatter that XLA runs in place on the kernel's output.
        grad = grad.at[jnp.arange(z.shape[0]), y].add(-scale)
        return grad, None

    loss.defvjp(forward, backward)
    return loss


def make_loss(
    *,
    ignore_index: int | None = None,
    label_smoothing: float = 0.0,
    z_loss: float = 0.0,
    in_place: bool = False,
    hinted: bool = False,
):
    """``ffi`` / ``ffi[options]``: the mean loss with xent_jax's options (its ``reduction="mean"``:
    over the examples that are not ignored), both passes from the kernels. ``hinted``
    (``ffi[hinted]``, ``ffi[hinted+options]``): the statistics by ``hinted_statistics`` around the
    label logit."""
    eps, z_coefficient = float(label_smoothing), float(z_loss)

    def rows(z, y):
        kept = jnp.ones(y.shape, bool) if ignore_index is None else y != ignore_index
        safe = jnp.where(kept, y, 0)
        label_logits = jnp.take_along_axis(z, safe[:, None], axis=-1)[:, 0]
        if hinted:
            lse, smooth = hinted_statistics(z, label_logits)
        else:
            lse, smooth = softmax_statistics(z)
        loss = (1 - eps) * (lse - label_logits) + eps / z.shape[-1] * smooth
        loss = loss + z_coefficient * jnp.square(lse)
        weight = kept / jnp.maximum(jnp.sum(kept), 1)
        return jnp.where(kept, loss, 0), lse, safe, weight

    @jax.custom_vjp
    def loss(z, y):
        per_row, _, _, weight = rows(z, y)
        return jnp.sum(per_row * weight)

    def forward(z, y):
        per_row, lse, safe, weight = rows(z, y)
        return jnp.sum(per_row * weight), (z, lse, safe, weight)

    def backward(residuals, ct):
        # d loss_i / dz = p (1 + 2 lambda lse) - (1 - eps) one-hot - eps / K.
        z, lse, safe, weight = residuals
        c = ct * weight
        scale, offset = c * (1 + 2 * z_coefficient * lse), -c * eps / z.shape[-1]
        grad = softmax_gradient(z, lse, scale, offset, in_place=in_place)
        grad = grad.at[jnp.arange(z.shape[0]), safe].add(-(1 - eps) * c)
        return grad, None

    loss.defvjp(forward, backward)
    return loss
