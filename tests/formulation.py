"""Switching the softmax row statistics to the one-pass (GPU / TPU) formulation on any platform,
for the tests of both formulations (``tests/conftest.py``, ``tests/test_online.py``)."""

import contextlib

import xent_jax


@contextlib.contextmanager
def one_pass_everywhere(on: bool = True):
    """Within the context, every platform uses the one-pass formulation when ``on``
    (``xent_jax.softmax_formulation``, which clears JAX's caches on entry and exit)."""
    if not on:
        yield
        return
    with xent_jax.softmax_formulation("one_pass"):
        yield
