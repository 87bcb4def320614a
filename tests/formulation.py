"""Switching the softmax row statistics to the one-pass (GPU / TPU) formulation on any platform,
for the tests of both formulations (``tests/conftest.py``, ``tests/test_online.py``)."""

import contextlib

import jax

from xent_jax import _online


@contextlib.contextmanager
def one_pass_everywhere(on: bool = True):
    """Within the context, every platform uses ``xent_jax._online`` when ``on``.

    Traces cached under the other formulation must not be reused: the caches are cleared on
    entry and on exit.
    """
    if not on:
        yield
        return
    jax.clear_caches()
    _online._EVERYWHERE = True
    try:
        yield
    finally:
        _online._EVERYWHERE = False
        jax.clear_caches()
