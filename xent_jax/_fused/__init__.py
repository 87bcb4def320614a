"""Fused linear + softmax cross-entropy that never materialises the ``[N, V]`` logits.

A language-model head computes ``logits = x @ w + bias`` for ``N`` tokens and ``V`` classes and
then a cross-entropy; the ``N x V`` logits and their gradient dominate memory. Here the loss is
computed block by block: tokens in blocks of ``block_size_tokens`` rows, the vocabulary in tiles
of ``block_size_vocab`` classes. Only one ``[tokens, classes]`` block of logits (and of their
gradient) exists at a time.

Two schedules share the same block arithmetic:

* **tiles** (any block sizes): a forward pass over the tiles keeps an online logsumexp per token
  (plus the label logit, the smoothing sums and the argmax); the backward pass of the custom VJP
  recomputes each tile once from the saved per-token logsumexp and turns it into the gradient of
  ``x``, ``w`` and ``bias`` right away (``8 N D V`` FLOPs in all, like Cut Cross-Entropy).
* **strip** (``block_size_vocab >= V`` and ``reduction`` ``"sum"`` / ``"mean"``): a block of tokens
  sees the whole vocabulary at once, so its logsumexp is final before the block is left and its
  gradients are computed in the same visit, during the forward pass (``6 N D V`` FLOPs, the same
  as the materialised loss, like Liger Kernel). Called without differentiation, only the loss is
  computed (``2 N D V``).

The three products of a block (``x_b @ w``, ``g_b @ w.T`` and ``x_b.T @ g_b``) are plain matrix
products: ``x`` is transposed once, outside the loops, because XLA:CPU runs a product whose left
operand contracts its first axis on a much slower path.

Block sizes are global: on a mesh each device holds its share of a block, so per-device memory
falls with the number of devices.

Block layout: a block of tokens is ``pn`` equal runs of consecutive rows, one from each of ``pn``
equal chunks of the token axis (``pn = 1`` on one device: a block is consecutive rows); a vocab
tile is likewise ``pv`` runs. With ``pn`` / ``pv`` equal to the number of devices an axis is
sharded over, every block spreads evenly over the devices, so XLA's automatic partitioning of
the loops needs no gathers.

Modules:

* :mod:`~xent_jax._fused._blocks`: the static plan of a call, block sizes, and views of the
  arrays in block / tile layout.
* :mod:`~xent_jax._fused._tile_math`: the arithmetic of one tile (logits, online logsumexp
  statistics, per-token loss and VJP coefficients, the tile's gradient).
* :mod:`~xent_jax._fused._passes`: the loops over blocks and tiles (stats, grad and strip passes).
* :mod:`~xent_jax._fused._local`: per-device entry points (inside ``shard_map`` on a mesh).
* :mod:`~xent_jax._fused._custom_vjp`: ``shard_map`` wrapping and the custom VJPs.
* :mod:`~xent_jax._fused._api`: the public fused function and its block plan.
* :mod:`~xent_jax._fused._vocab_parallel`: the same tile arithmetic on logits that are already
  materialised and split along the classes over a mesh (one tile per device).
* :mod:`~xent_jax._fused._distill` and :mod:`~xent_jax._fused._distill_local`: the fused
  distillation loss (student ``x @ w`` against teacher logits or ``teacher_x @ teacher_w``).

Options are parsed once, by :func:`xent_jax._options.softmax_options`, at the public boundary;
the mesh layout comes from :mod:`xent_jax._mesh`.
"""

from xent_jax._fused._api import (
    LinearCrossEntropyAux,
    linear_softmax_cross_entropy_with_integer_labels,
)
from xent_jax._fused._distill import linear_distillation_loss
from xent_jax._fused._vocab_parallel import (
    vocab_parallel_integer_loss,
    vocab_parallel_softmax_cross_entropy_with_integer_labels,
)

__all__ = [
    "LinearCrossEntropyAux",
    "linear_distillation_loss",
    "linear_softmax_cross_entropy_with_integer_labels",
    "vocab_parallel_integer_loss",
    "vocab_parallel_softmax_cross_entropy_with_integer_labels",
]
