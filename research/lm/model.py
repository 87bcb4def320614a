"""A decoder-only transformer in Flax NNX whose weights carry mesh-axis annotations.

Pre-norm blocks (RMSNorm, causal self-attention with RoPE or learned positions, a GELU MLP),
a final RMSNorm, and an output matrix ``[D, V]`` that is either the transposed token embedding
(tied) or a parameter of its own. The model returns the final hidden states; the loss applies
the output matrix (fused or materialised), so the ``B x T x V`` logits are never built here.

Sharding annotations (``nnx.with_partitioning``) name two mesh axes: ``"model"`` splits the
vocabulary of the embedding / output matrix, the attention heads and the MLP's hidden units
(Megatron-style column / row splits); the batch is split over ``"data"`` by the caller.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

MODEL_AXIS = "model"


def _init(std: float, sharding: tuple):
    return nnx.with_partitioning(nnx.initializers.normal(std), sharding)


def rope(x: jax.Array, positions: jax.Array, base: float = 10000.0) -> jax.Array:
    """Rotary position embedding of ``x`` ``[B, T, H, K]`` (K even) at ``positions`` ``[T]``."""
    half = x.shape[-1] // 2
    freq = base ** (-jnp.arange(half, dtype=jnp.float32) / half)
    angle = positions[:, None].astype(jnp.float32) * freq[None, :]  # [T, K/2]
    cos, sin = jnp.cos(angle)[None, :, None, :], jnp.sin(angle)[None, :, None, :]
    x1, x2 = x[..., :half], x[..., half:]
    return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1).astype(x.dtype)


class Attention(nnx.Module):
    """Causal multi-head self-attention; heads are split over the model axis."""

    def __init__(self, dim: int, heads: int, layers: int, rope: bool, *, rngs: nnx.Rngs):
        self.heads, self.rope = heads, rope
        std, out_std = dim**-0.5, dim**-0.5 / (2 * layers) ** 0.5
        column = _init(std, (None, MODEL_AXIS))
        self.q = nnx.Linear(dim, dim, use_bias=False, kernel_init=column, rngs=rngs)
        self.k = nnx.Linear(dim, dim, use_bias=False, kernel_init=column, rngs=rngs)
        self.v = nnx.Linear(dim, dim, use_bias=False, kernel_init=column, rngs=rngs)
        self.out = nnx.Linear(
            dim, dim, use_bias=False, kernel_init=_init(out_std, (MODEL_AXIS, None)), rngs=rngs
        )

    def __call__(self, x: jax.Array) -> jax.Array:
        b, t, d = x.shape
        split = lambda y: y.reshape(b, t, self.heads, d // self.heads)
        q, k, v = split(self.q(x)), split(self.k(x)), split(self.v(x))
        if self.rope:
            positions = jnp.arange(t)
            q, k = rope(q, positions), rope(k, positions)
        scores = jnp.einsum("bqhk,bshk->bhqs", q, k) / jnp.sqrt(q.shape[-1]).astype(q.dtype)
        # A [T, T] mask (not broadcast to the batch): the scanned backward pass keeps it per layer.
        causal = jnp.tril(jnp.ones((t, t), bool))
        probs = jax.nn.softmax(jnp.where(causal, scores, -jnp.inf), axis=-1)
        y = jnp.einsum("bhqs,bshk->bqhk", probs, v)
        return self.out(y.reshape(b, t, d))


class MLP(nnx.Module):
    def __init__(self, dim: int, hidden: int, layers: int, *, rngs: nnx.Rngs):
        self.up = nnx.Linear(
            dim, hidden, use_bias=False, kernel_init=_init(dim**-0.5, (None, MODEL_AXIS)), rngs=rngs
        )
        out_std = hidden**-0.5 / (2 * layers) ** 0.5
        self.down = nnx.Linear(
            hidden, dim, use_bias=False, kernel_init=_init(out_std, (MODEL_AXIS, None)), rngs=rngs
        )

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.down(nnx.gelu(self.up(x)))


class Block(nnx.Module):
    """Pre-norm residual block: ``x + attn(norm(x))``, then ``x + mlp(norm(x))``."""

    def __init__(self, dim, heads, hidden, layers, rope, *, rngs: nnx.Rngs):
        self.norm1 = nnx.RMSNorm(dim, rngs=rngs)
        self.attn = Attention(dim, heads, layers, rope, rngs=rngs)
        self.norm2 = nnx.RMSNorm(dim, rngs=rngs)
        self.mlp = MLP(dim, hidden, layers, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class Transformer(nnx.Module):
    """Decoder-only language model returning final hidden states ``[B, T, D]``.

    The blocks are stacked along a leading layer axis and applied with ``nnx.scan`` (one
    compiled block, as in MaxText); with ``remat`` each block is recomputed in the backward
    pass, so only the ``[B, T, D]`` input of every block is kept. (Rematerialising unrolled
    blocks saves nothing on XLA:CPU, whose scheduler hoists the recomputation; inside a scan
    it cannot.)

    Args:
      vocab_size: number of token ids.
      dim: model width D.
      layers: number of blocks.
      heads: attention heads (divisible by the model-axis size when sharded).
      mlp_hidden: MLP width.
      max_len: longest sequence (learned positions only).
      positions: ``"rope"`` or ``"learned"``.
      tie_embeddings: output matrix = transposed token embedding.
      remat: recompute each block in the backward pass.
      rngs: parameter initialisation.
    """

    def __init__(
        self,
        vocab_size: int,
        dim: int,
        layers: int,
        heads: int,
        mlp_hidden: int,
        max_len: int,
        positions: str = "rope",
        tie_embeddings: bool = True,
        remat: bool = False,
        *,
        rngs: nnx.Rngs,
    ):
        self.tie_embeddings, self.remat = tie_embeddings, remat
        self.embed = nnx.Embed(
            vocab_size,
            dim,
            embedding_init=_init(dim**-0.5 if tie_embeddings else 1.0, (MODEL_AXIS, None)),
            rngs=rngs,
        )
        self.pos = (
            nnx.Param(nnx.initializers.normal(0.02)(rngs.params(), (max_len, dim)))
            if positions == "learned"
            else None
        )

        # One Block per layer, stacked on a new leading axis that no mesh axis splits.
        @nnx.split_rngs(splits=layers)
        @nnx.vmap(in_axes=(0,), out_axes=0, transform_metadata={nnx.PARTITION_NAME: None})
        def make_blocks(rngs: nnx.Rngs) -> Block:
            return Block(dim, heads, mlp_hidden, layers, positions == "rope", rngs=rngs)

        self.blocks = make_blocks(rngs)
        self.norm = nnx.RMSNorm(dim, rngs=rngs)
        self.unembed = (
            None
            if tie_embeddings
            else nnx.Param(_init(dim**-0.5, (None, MODEL_AXIS))(rngs.params(), (dim, vocab_size)))
        )

    def output_matrix(self) -> jax.Array:
        """The ``[D, V]`` matrix that maps hidden states to logits."""
        if self.tie_embeddings:
            return self.embed.embedding[...].T
        return self.unembed[...]

    def __call__(self, tokens: jax.Array) -> jax.Array:
        x = self.embed(tokens)
        if self.pos is not None:
            x = x + self.pos[...][: tokens.shape[1]]

        def apply(x: jax.Array, block: Block) -> jax.Array:
            return block(x)

        if self.remat:
            apply = nnx.remat(apply)
        x = nnx.scan(apply, in_axes=(nnx.Carry, 0), out_axes=nnx.Carry)(x, self.blocks)
        return self.norm(x)
