"""xent_jax: exact, stable, differentiable cross-entropy losses for JAX.

Every loss is a pure function of arrays, safe under ``jit``, ``vmap``, ``grad`` and
``hessian``. Names follow optax where the concept is the same.
"""

from xent_jax import analytic
from xent_jax._focal import (
    poly_loss_cross_entropy,
    softmax_focal_loss,
    softmax_focal_loss_with_integer_labels,
)
from xent_jax._fused import (
    LinearCrossEntropyAux,
    linear_distillation_loss,
    linear_softmax_cross_entropy_with_integer_labels,
    vocab_parallel_softmax_cross_entropy_with_integer_labels,
)
from xent_jax._information import (
    binary_entropy,
    cross_entropy,
    entropy,
    js_divergence,
    kl_divergence,
)
from xent_jax._labels import checked, validate_integer_labels
from xent_jax._platform import softmax_formulation
from xent_jax._probabilities import (
    binary_cross_entropy,
    categorical_cross_entropy,
    sparse_categorical_cross_entropy,
)
from xent_jax._sigmoid import sigmoid_binary_cross_entropy, sigmoid_focal_loss
from xent_jax._softmax import (
    softmax_cross_entropy,
    softmax_cross_entropy_with_integer_labels,
)
from xent_jax._validation import Reduction

__version__ = "0.1.0"

__all__ = [
    "LinearCrossEntropyAux",
    "Reduction",
    "analytic",
    "binary_cross_entropy",
    "binary_entropy",
    "categorical_cross_entropy",
    "checked",
    "cross_entropy",
    "entropy",
    "js_divergence",
    "kl_divergence",
    "linear_distillation_loss",
    "linear_softmax_cross_entropy_with_integer_labels",
    "poly_loss_cross_entropy",
    "sigmoid_binary_cross_entropy",
    "sigmoid_focal_loss",
    "softmax_cross_entropy",
    "softmax_cross_entropy_with_integer_labels",
    "softmax_focal_loss",
    "softmax_focal_loss_with_integer_labels",
    "softmax_formulation",
    "sparse_categorical_cross_entropy",
    "validate_integer_labels",
    "vocab_parallel_softmax_cross_entropy_with_integer_labels",
]
