"""The one tolerance table of the test suite, keyed by the dtype a computation runs in, and the
one ``assert_close`` that applies it.

Half-precision inputs are computed in float32 by xent_jax, so their *losses* are compared with
the float32 row; the half rows apply to values that are returned in the half dtype themselves
(gradients). Never loosen an entry to make a test pass: fix the code or the reference.
"""

import contextlib

import jax
import jax.numpy as jnp
import numpy as np

TOLERANCES: dict[type, dict[str, float]] = {
    jnp.float64: {"rtol": 1e-10, "atol": 1e-12},
    jnp.float32: {"rtol": 2e-5, "atol": 2e-6},
    jnp.bfloat16: {"rtol": 1.6e-2, "atol": 1e-2},
    jnp.float16: {"rtol": 2e-3, "atol": 1e-3},
}


def tolerance(dtype) -> dict[str, float]:
    """Returns ``{"rtol": ..., "atol": ...}`` for ``dtype`` (a dtype, a scalar type or a name)."""
    return TOLERANCES[np.dtype(dtype).type]


def assert_close(actual, expected, dtype=np.float32, *, err_msg: str = "", extra_atol: float = 0.0):
    """``actual`` equals ``expected`` within the table's entry for ``dtype``, compared in float64.

    Args:
      actual: the value under test.
      expected: the reference value.
      dtype: the dtype the compared values were computed in (the table's key).
      err_msg: printed on failure.
      extra_atol: an absolute error a test can justify on top of the table's (e.g. the spacing
        of float32 numbers the size of the inputs, which no float32 computation can beat); it
        never replaces the table's entry.
    """
    table = tolerance(dtype)
    np.testing.assert_allclose(
        np.asarray(actual, np.float64),
        np.asarray(expected, np.float64),
        rtol=table["rtol"],
        atol=table["atol"] + extra_atol,
        err_msg=err_msg,
    )


def enable_x64_for(dtype):
    """``jax.enable_x64(True)`` for float64 computations, a no-op context otherwise (never the
    global flag)."""
    return jax.enable_x64(True) if np.dtype(dtype) == np.float64 else contextlib.nullcontext()
