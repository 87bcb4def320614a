"""Mesh, train state, the jitted train / eval / sampling steps, checkpoints, and the loop.

The loss is ``xent_jax.linear_softmax_cross_entropy_with_integer_labels`` on the final hidden
states and the output matrix (``train.loss="fused"``), given the mesh and its axes so that the
vocabulary stays split over ``"model"`` and the batch over ``"data"``; ``train.loss =
"materialised"`` builds the ``B x T x V`` logits and calls
``xent_jax.softmax_cross_entropy_with_integer_labels`` instead, for comparison.
"""

from __future__ import annotations

import dataclasses
import json
import math
import signal
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
from flax import nnx
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

import xent_jax
from research.common import NonFiniteLossError, progress
from research.lm.data import IGNORE, Batches, eval_batches
from research.lm.model import MODEL_AXIS, Transformer

DATA_AXIS = "data"
LOSSES = ("fused", "materialised")


class InjectedFailure(RuntimeError):
    """Raised by ``debug.fail_after_step``: a crash without a checkpoint at that step."""


def make_mesh(data: int, model: int) -> jax.sharding.Mesh:
    """A ``(data, model)`` mesh over the first ``data * model`` devices (``data=-1``: all the
    devices that ``model`` leaves)."""
    if data == -1:
        data = jax.device_count() // model
    count = data * model
    if count < 1 or count > jax.device_count():
        raise ValueError(
            f"config.mesh asks for {data} x {model} devices; {jax.device_count()} available"
        )
    return jax.make_mesh(
        (data, model),
        (DATA_AXIS, MODEL_AXIS),
        axis_types=(AxisType.Auto, AxisType.Auto),
        devices=jax.devices()[:count],
    )


def make_optimizer(cfg: Any) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """AdamW with linear warm-up then cosine decay, after global-norm gradient clipping; no
    weight decay on the norms' scales."""
    schedule = optax.warmup_cosine_decay_schedule(
        init_value=cfg.learning_rate / max(cfg.warmup_steps, 1),
        peak_value=cfg.learning_rate,
        warmup_steps=cfg.warmup_steps,
        decay_steps=cfg.steps,
        end_value=cfg.learning_rate * cfg.min_lr_ratio,
    )

    def decay_mask(params):
        return jax.tree_util.tree_map_with_path(
            lambda path, _: "scale" not in jax.tree_util.keystr(path), params
        )

    tx = optax.chain(
        optax.clip_by_global_norm(cfg.grad_clip),
        optax.adamw(schedule, b1=cfg.b1, b2=cfg.b2, weight_decay=cfg.weight_decay, mask=decay_mask),
    )
    return tx, schedule


def make_loss(kind: str, mesh, cfg: Any, *, z_loss: float, reduction: str) -> Callable:
    """``loss(hidden [B, T, D], w [D, V], labels [B, T])`` with padding (IGNORE) left out."""
    blocks = {
        "block_size_tokens": cfg.block_size_tokens or None,
        "block_size_vocab": cfg.block_size_vocab or None,
    }
    if kind == "fused":
        return lambda h, w, y: xent_jax.linear_softmax_cross_entropy_with_integer_labels(
            h,
            w,
            y,
            ignore_index=IGNORE,
            z_loss=z_loss,
            reduction=reduction,
            mesh=mesh,
            vocab_axis=MODEL_AXIS,
            batch_axis=DATA_AXIS,
            **blocks,
        )
    if kind == "materialised":
        return lambda h, w, y: xent_jax.softmax_cross_entropy_with_integer_labels(
            h @ w, y, ignore_index=IGNORE, z_loss=z_loss, reduction=reduction
        )
    raise ValueError(f"config.train.loss must be one of {LOSSES}, got {kind!r}")


@dataclasses.dataclass
class LM:
    """The model's graph, its state's shardings, and the jitted functions on one mesh."""

    config: Any
    vocab_size: int
    mesh: jax.sharding.Mesh
    graphdef: Any = None
    sharding: Any = None
    schedule: Any = None
    _jitted: dict = dataclasses.field(default_factory=dict)

    def init_state(self):
        """Model and optimiser state, initialised from ``config.seed`` and already sharded."""
        m, t = self.config.model, self.config.train
        tx, self.schedule = make_optimizer(t)

        def create():
            model = Transformer(
                self.vocab_size,
                m.dim,
                m.layers,
                m.heads,
                m.mlp_hidden,
                m.seq_len,
                positions=m.positions,
                tie_embeddings=m.tie_embeddings,
                remat=m.remat,
                rngs=nnx.Rngs(self.config.seed),
            )
            return model, nnx.Optimizer(model, tx, wrt=nnx.Param)

        with jax.set_mesh(self.mesh):
            model, optimizer = nnx.jit(create)()
        self.graphdef, state = nnx.split((model, optimizer))
        self.sharding = jax.tree.map(lambda a: a.sharding, state)
        return state

    def abstract_state(self, state):
        return jax.tree.map(
            lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=a.sharding), state
        )

    def put(self, array: np.ndarray, spec: P | None = None) -> jax.Array:
        """A global array from the same host array on every process (each keeps its shards);
        split over the data axis unless ``spec`` says otherwise."""
        sharding = NamedSharding(self.mesh, P(DATA_AXIS) if spec is None else spec)
        return jax.make_array_from_callback(array.shape, sharding, lambda idx: array[idx])

    def train_step(self, kind: str | None = None, donate: bool = True):
        """``step(state, inputs, labels, scale) -> (state, {"loss", "grad_norm"})``; ``scale``
        multiplies the objective (1.0; NaN for ``debug.nan_after_step``). Cached per
        ``(kind, donate)``, so the resume check and the step costs reuse the compiled step."""
        t = self.config.train
        key = ("train", kind or t.loss, donate)
        if key in self._jitted:
            return self._jitted[key]
        loss_fn = make_loss(kind or t.loss, self.mesh, t, z_loss=t.z_loss, reduction="mean")
        graphdef = self.graphdef

        def step(state, inputs, labels, scale):
            model, optimizer = nnx.merge(graphdef, state)

            def objective(model):
                return loss_fn(model(inputs), model.output_matrix(), labels) * scale

            loss, grads = nnx.value_and_grad(objective)(model)
            optimizer.update(model, grads)
            return nnx.state((model, optimizer)), {
                "loss": loss,
                "grad_norm": optax.tree.norm(grads),
            }

        self._jitted[key] = jax.jit(
            step, donate_argnums=(0,) if donate else (), out_shardings=(self.sharding, None)
        )
        return self._jitted[key]

    def eval_step(self):
        """``step(state, inputs, labels) -> (summed nats, valid tokens)`` (no z-loss)."""
        if "eval" in self._jitted:
            return self._jitted["eval"]
        loss_fn = make_loss("fused", self.mesh, self.config.train, z_loss=0.0, reduction="sum")
        graphdef = self.graphdef

        @jax.jit
        def step(state, inputs, labels):
            model, _ = nnx.merge(graphdef, state)
            nats = loss_fn(model(inputs), model.output_matrix(), labels)
            return nats, jnp.sum(labels != IGNORE)

        self._jitted["eval"] = step
        return step

    def sampler(self, new_tokens: int):
        """``sample(state, tokens [n, T], lengths [n], temperatures [n], seed)``: extends each
        row after its ``lengths`` prompt tokens, greedily where the temperature is 0."""
        graphdef = self.graphdef

        @jax.jit
        def sample(state, tokens, lengths, temperatures, seed):
            model_def, model_state = nnx.split(nnx.merge(graphdef, state)[0])
            rows = jnp.arange(tokens.shape[0])

            def body(i, carry):
                # The state rides in the carry: NNX modules cannot use arrays of an outer trace.
                tokens, key, model_state = carry
                model = nnx.merge(model_def, model_state)
                pos = lengths + i - 1
                logits = model(tokens)[rows, pos] @ model.output_matrix()
                key, sub = jax.random.split(key)
                hot = jnp.maximum(temperatures, 1e-6)[:, None]
                drawn = jax.random.categorical(sub, logits / hot)
                chosen = jnp.where(temperatures > 0, drawn, jnp.argmax(logits, -1))
                tokens = tokens.at[rows, pos + 1].set(chosen.astype(tokens.dtype))
                return tokens, key, model_state

            carry = (tokens, jax.random.key(seed), model_state)
            return jax.lax.fori_loop(0, new_tokens, body, carry)[0]

        return sample


def evaluate(lm: LM, step_fn, state, stream: np.ndarray, max_batches: int = 0) -> tuple:
    """(summed nats, predicted tokens) over a stream's windows in order."""
    c = lm.config
    nats, count = 0.0, 0
    for x, y in eval_batches(stream, c.model.seq_len, c.eval.batch_size, max_batches):
        n, k = step_fn(state, lm.put(x), lm.put(y))
        nats += float(n)
        count += int(k)
    return nats, count


class Checkpoints:
    """Orbax checkpoints of the train state and the data iterator's position, every k steps."""

    def __init__(self, directory: Path, max_to_keep: int):
        self.manager = ocp.CheckpointManager(
            directory.absolute(),
            options=ocp.CheckpointManagerOptions(
                max_to_keep=max_to_keep, enable_async_checkpointing=False
            ),
        )

    def steps(self) -> list[int]:
        return sorted(self.manager.all_steps())

    def save(self, step: int, state, data_state: dict) -> None:
        self.manager.save(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardSave(state), data=ocp.args.JsonSave(data_state)
            ),
            force=True,
        )
        self.manager.wait_until_finished()

    def restore(self, step: int, abstract_state) -> tuple[Any, dict]:
        restored = self.manager.restore(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardRestore(abstract_state), data=ocp.args.JsonRestore()
            ),
        )
        return restored.state, dict(restored.data)

    def close(self) -> None:
        self.manager.close()


class StopSignal:
    """SIGTERM (a preemption notice) sets ``requested``; the loop then checkpoints and stops."""

    def __init__(self):
        self.requested = False
        self._previous = None

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGTERM, self._handle)
        return self

    def _handle(self, signum, frame):
        self.requested = True

    def __exit__(self, *exc):
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)


class MetricsLog:
    """``metrics.jsonl``, appended to and never truncated (a resumed run adds its lines)."""

    def __init__(self, path: Path, enabled: bool):
        self.path, self.enabled = path, enabled

    def __call__(self, **record: Any) -> None:
        if self.enabled:
            with self.path.open("a") as f:
                f.write(json.dumps(record) + "\n")

    def records(self) -> list[dict]:
        if not self.path.exists():
            return []
        return [json.loads(line) for line in self.path.read_text().splitlines() if line]


def step_losses(records: list[dict]) -> dict[int, float]:
    """The loss of every train step (the latest record of a step recomputed after a crash)."""
    return {r["step"]: r["loss"] for r in records if r.get("kind") == "train"}


@dataclasses.dataclass
class LoopResult:
    state: Any
    step: int
    stopped: str | None  # None (finished), "preempted", "stop_at_step"
    tokens: int
    seconds: float


def train_loop(
    lm: LM,
    state,
    batches: Batches,
    checkpoints: Checkpoints,
    log: MetricsLog,
    start_step: int,
    val_stream: np.ndarray,
    stop: StopSignal,
) -> LoopResult:
    """Train from ``start_step`` to ``config.train.steps`` (or ``train.stop_at_step``)."""
    c = lm.config
    t, ck, ev, dbg = c.train, c.checkpoint, c.eval, c.debug
    step_fn, eval_fn = lm.train_step(), lm.eval_step()
    last = min(t.steps, t.stop_at_step) if t.stop_at_step else t.steps
    pending: list[tuple[int, dict, int, float]] = []
    tokens, clock = 0, time.perf_counter()
    mark = clock  # when the losses were last read: tokens/s over the steps since
    with progress(max(last - start_step, 0), "language_model") as bar:

        def flush() -> None:
            nonlocal mark
            for step, metrics, ntok, lr in pending:
                loss, gnorm = float(metrics["loss"]), float(metrics["grad_norm"])
                if not (math.isfinite(loss) and math.isfinite(gnorm)):
                    log(kind="stopped", step=step, loss=str(loss), grad_norm=str(gnorm))
                    kept = checkpoints.steps()
                    raise NonFiniteLossError(
                        f"language_model: loss {loss}, gradient norm {gnorm} at step {step}; "
                        f"stopping with the last good checkpoint kept (steps {kept})"
                    )
                log(kind="train", step=step, loss=loss, grad_norm=gnorm, lr=lr, tokens=ntok)
            if pending:
                now = time.perf_counter()
                done = sum(p[2] for p in pending)
                rate = done / max(now - mark, 1e-9)
                mark = now
                bar.set_postfix(loss=f"{float(pending[-1][1]['loss']):.3f}", tok_s=f"{rate:.0f}")
            pending.clear()

        for step in range(start_step + 1, last + 1):
            inputs, labels = batches.next()
            scale = np.float32("nan" if dbg.nan_after_step and step > dbg.nan_after_step else 1)
            state, metrics = step_fn(state, lm.put(inputs), lm.put(labels), scale)
            ntok = int((labels != IGNORE).sum())
            tokens += ntok
            pending.append((step, metrics, ntok, float(lm.schedule(step - 1))))
            bar.update(1)
            save = step % ck.every == 0 or step == last
            if save or step % c.log_every == 0:
                flush()
            if save:
                checkpoints.save(step, state, batches.state())
            if ev.every and (step % ev.every == 0 or step == t.steps):
                nats, count = evaluate(lm, eval_fn, state, val_stream, ev.val_batches)
                log(kind="eval", step=step, val_loss=nats / max(count, 1), val_tokens=count)
            if dbg.fail_after_step and step == dbg.fail_after_step:
                flush()
                raise InjectedFailure(f"debug.fail_after_step={step}: crashing on purpose")
            # Read once, here: a SIGTERM at any point of this step is honoured after its save.
            if stop.requested:
                flush()
                if not save:
                    checkpoints.save(step, state, batches.state())
                log(kind="preempted", step=step)
                return LoopResult(state, step, "preempted", tokens, time.perf_counter() - clock)
        flush()
    stopped = "stop_at_step" if last < t.steps else None
    return LoopResult(state, last, stopped, tokens, time.perf_counter() - clock)
