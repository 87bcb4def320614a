"""Shared test settings.

* Float32 matrix products run in full float32 inside every test: on GPUs and TPUs JAX's
  default multiplies float32 in reduced precision (TF32 / bfloat16 passes, relative errors
  ~1e-4), which the float64 references of these tests would flag. A context per test, never a
  global flip; on CPU it changes nothing. The fused loss's ``precision=`` argument is tested on
  its own.
* The softmax losses have two formulations of their row statistics, chosen per platform (the
  CPU one, and the one-pass one of ``xent_jax._online`` for GPUs and TPUs). The modules in
  ``BOTH_FORMULATIONS`` run every test with each, so that CI (CPU only) checks the GPU
  formulation against the same references.
"""

import jax
import pytest

from tests.formulation import one_pass_everywhere

BOTH_FORMULATIONS = {
    "tests.test_reference_losses",
    "tests.test_edge_cases",
    "tests.test_autodiff",
    "tests.test_properties",
}


@pytest.fixture(autouse=True)
def _full_float32_matmuls():
    with jax.default_matmul_precision("highest"):
        yield


def pytest_generate_tests(metafunc):
    if metafunc.module.__name__ in BOTH_FORMULATIONS:
        # Module scope: pytest runs all of a module's tests with one formulation, then with the
        # other, so the caches are cleared twice per module rather than around every test.
        metafunc.parametrize(
            "softmax_formulation", ["per_platform", "one_pass"], indirect=True, scope="module"
        )


@pytest.fixture(autouse=True, scope="module")
def softmax_formulation(request):
    """``"one_pass"``: the GPU/TPU formulation on every platform while the fixture is active."""
    formulation = getattr(request, "param", "per_platform")
    with one_pass_everywhere(formulation == "one_pass"):
        yield formulation
