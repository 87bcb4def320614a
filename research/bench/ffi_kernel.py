"""``ffi[no-shift]``: the gradient pass as a hand-written XLA FFI CPU kernel (benchmark only).

A reference point for the float32 forward + backward speed bar, not a loss to train with. The
forward is ``jnp[no-shift]``'s (one unshifted ``exp`` pass, wrong beyond the float32 ``exp``
range); the gradient ``exp(z - lse) * ct`` comes from ``softmax_grad_kernel.cc`` (hand-vectorised
``exp``, streaming stores, XLA's thread pool), then ``-ct`` is scattered at the labels in place.
It answers: would a custom CPU kernel move the ratio to optax that XLA:CPU's fused code cannot?

The kernel is compiled on first use with the C++ compiler on ``PATH`` (``$CXX`` or ``c++``) for
this machine (``-march=native``) against the XLA FFI headers that ship with jaxlib, in a
temporary directory removed once the library is loaded. ``available()`` is False when that
fails (no compiler, not on CPU); the implementation is then skipped.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import jax
import jax.numpy as jnp

SOURCE = Path(__file__).with_name("softmax_grad_kernel.cc")
TARGET = "xent_bench_softmax_grad"
FLAGS = ("-O3", "-march=native", "-std=c++17", "-shared", "-fPIC", "-fno-math-errno", "-w")


def compiler() -> str | None:
    return shutil.which(os.environ.get("CXX", "c++"))


def build(directory: str | Path) -> Path:
    """Compiles the kernel into ``directory`` (raises ``RuntimeError`` with the compiler's
    message when it fails)."""
    cxx = compiler()
    if cxx is None:
        raise RuntimeError("no C++ compiler on PATH (set CXX)")
    digest = hashlib.sha256(SOURCE.read_bytes() + " ".join(FLAGS).encode()).hexdigest()[:12]
    library = Path(directory) / f"softmax_grad_{digest}.so"
    command = [cxx, *FLAGS, f"-I{jax.ffi.include_dir()}", str(SOURCE), "-o", str(library)]
    result = subprocess.run(command, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed:\n{result.stderr[-2000:]}")
    return library


@functools.cache
def available() -> bool:
    """Builds and registers the kernel once per process; False when it cannot run here."""
    if jax.default_backend() != "cpu":
        return False
    directory = tempfile.mkdtemp(prefix="xent_bench_ffi_")
    try:
        handler = getattr(ctypes.cdll.LoadLibrary(str(build(directory))), TARGET)
    except RuntimeError:
        return False
    finally:
        shutil.rmtree(directory, ignore_errors=True)  # a loaded library outlives its file
    jax.ffi.register_ffi_target(TARGET, jax.ffi.pycapsule(handler), platform="cpu")
    return True


def softmax_gradient(z: jax.Array, lse: jax.Array, scale: jax.Array) -> jax.Array:
    """``exp(z - lse[:, None]) * scale[:, None]`` by the kernel (float32, rows along axis 0)."""
    call = jax.ffi.ffi_call(TARGET, jax.ShapeDtypeStruct(z.shape, jnp.float32))
    return call(z, lse, scale)


def _unshifted_logsumexp(z: jax.Array) -> jax.Array:
    # No max shift and no fallback: +inf / NaN for float32 logits beyond about +-88.
    return jnp.log(jnp.sum(jnp.exp(z), axis=-1))


@jax.custom_vjp
def softmax_int_loss(z: jax.Array, y: jax.Array) -> jax.Array:
    """Mean integer-label softmax cross-entropy of float32 logits ``[N, K]``."""
    return _forward(z, y)[0]


def _forward(z, y):
    lse = _unshifted_logsumexp(z)
    label_logits = jnp.take_along_axis(z, y[:, None], axis=-1)[:, 0]
    return jnp.mean(lse - label_logits), (z, y, lse)


def _backward(residuals, ct):
    z, y, lse = residuals
    scale = jnp.full(lse.shape, ct / z.shape[0], jnp.float32)
    grad = softmax_gradient(z, lse, scale)
    # The one-hot term: a scatter that XLA runs in place on the kernel's output.
    grad = grad.at[jnp.arange(z.shape[0]), y].add(-scale)
    return grad, None


softmax_int_loss.defvjp(_forward, _backward)
