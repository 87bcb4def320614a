"""A language model trained with xent_jax's fused, sharded loss on real text.

A decoder-only Flax NNX transformer learns next-token prediction on the Python standard
library's source (byte-level BPE, vocabulary from the config) with
``xent_jax.linear_softmax_cross_entropy_with_integer_labels`` on its final hidden states, on one
device or on a ``(data, model)`` mesh of many, with Orbax checkpoints that a killed run resumes
from exactly. It reports validation / test bits per byte beside zlib -9, bz2 -9, xz -9 and a
unigram model on the same bytes, the fused step's temporary memory and time against the
materialised loss, and samples. Launch commands (one device, a mesh, two processes, a cluster)
are in ``configs/language_model.py``:

    python -m research.language_model --config configs/language_model.py[:smoke|:gpu] \
        --workdir DIR [--config.KEY=VALUE ...]

Running again with the same ``--workdir`` resumes from its latest checkpoint. Exit status: 0
done, 1 non-finite loss (the last good checkpoint is kept), 2 bad config, 143 stopped by SIGTERM
after a checkpoint.
"""

from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path
from typing import Any

import jax
import numpy as np
from absl import app

from research.common import ConfigError, Workdir, check_config, cli
from research.lm import data as lmdata
from research.lm import report as lmreport
from research.lm.model import MODEL_AXIS
from research.lm.train import (
    LM,
    LOSSES,
    Checkpoints,
    MetricsLog,
    StopSignal,
    evaluate,
    make_mesh,
    step_losses,
    train_loop,
)

# Sections whose change makes a checkpoint meaningless: a resumed run must use the same ones.
FIXED_SECTIONS = ("seed", "data", "tokenizer", "model")
FIXED_TRAIN_KEYS = ("loss", "batch_size", "steps", "learning_rate", "warmup_steps", "z_loss")


def rules(config: Any) -> dict[str, tuple]:
    """Value checks, each naming the key it guards."""
    m = config.model
    return {
        "seed": (lambda v: isinstance(v, int) and v >= 0, "an int >= 0"),
        "data.val_fraction": (lambda v: 0 < v < 0.5, "a fraction in (0, 0.5)"),
        "data.test_fraction": (lambda v: 0 < v < 0.5, "a fraction in (0, 0.5)"),
        "data.max_files": (lambda v: v == 0 or v >= 3, "0 (all) or >= 3"),
        "tokenizer.vocab_size": (lambda v: v >= 257, "must be >= 257 (256 bytes + EOT)"),
        "model.dim": (
            lambda v: v % m.heads == 0 and (v // m.heads) % 2 == 0,
            "divisible by model.heads into an even head size (RoPE)",
        ),
        "model.layers": (lambda v: v >= 1, "must be >= 1"),
        "model.positions": (lambda v: v in ("rope", "learned"), "'rope' or 'learned'"),
        "model.seq_len": (lambda v: v >= 8, "must be >= 8"),
        "train.loss": (lambda v: v in LOSSES, f"one of {LOSSES}"),
        "train.batch_size": (lambda v: v >= 1, "must be >= 1"),
        "train.steps": (lambda v: v >= 1, "must be >= 1"),
        "train.stop_at_step": (lambda v: 0 <= v, "0 or a step"),
        "train.learning_rate": (lambda v: v > 0, "must be > 0"),
        "train.warmup_steps": (lambda v: 0 <= v < config.train.steps, "in [0, train.steps)"),
        "train.z_loss": (lambda v: v >= 0, "must be >= 0"),
        "mesh.data": (lambda v: v == -1 or v >= 1, "-1 or >= 1"),
        "mesh.model": (lambda v: v >= 1, "must be >= 1"),
        "checkpoint.every": (lambda v: v >= 1, "must be >= 1"),
        "checkpoint.max_to_keep": (lambda v: v >= 2, "must be >= 2 (the resume check)"),
        "eval.batch_size": (lambda v: v >= 1, "must be >= 1"),
        "log_every": (lambda v: v >= 1, "must be >= 1"),
        "report.prompt_tokens": (
            lambda v: 1 <= v and v + 1 + config.report.sample_tokens <= m.seq_len,
            "prompt + 1 + report.sample_tokens must fit in model.seq_len",
        ),
    }


def check_mesh_divides(config: Any, mesh) -> None:
    """Sizes the mesh axes split must be divisible by them."""
    data, model = mesh.shape["data"], mesh.shape[MODEL_AXIS]
    m = config.model
    for key, value, axis, size in (
        ("train.batch_size", config.train.batch_size, "data", data),
        ("eval.batch_size", config.eval.batch_size, "data", data),
        ("tokenizer.vocab_size", config.tokenizer.vocab_size, "model", model),
        ("model.heads", m.heads, "model", model),
        ("model.mlp_hidden", m.mlp_hidden, "model", model),
    ):
        if value % size:
            raise ConfigError(
                f"bad value for 'config.{key}': {value} (not divisible by the "
                f"{axis} axis size {size})"
            )


def init_distributed(cfg: Any) -> None:
    """``jax.distributed.initialize`` for multi-process runs (before any computation)."""
    if not cfg.auto and cfg.num_processes <= 1:
        return
    if jax.distributed.is_initialized():
        return
    if cfg.cpu_collectives:
        # Process-wide and read when the CPU client starts: only multi-process runs set it.
        jax.config.update("jax_cpu_collectives_implementation", cfg.cpu_collectives)
    if cfg.auto:
        jax.distributed.initialize()
    else:
        jax.distributed.initialize(
            coordinator_address=cfg.coordinator_address,
            num_processes=cfg.num_processes,
            process_id=cfg.process_id,
        )


def _sync(name: str) -> None:
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


def main_process_first(fn):
    """Run ``fn`` on process 0, then on the others (which read what process 0 wrote)."""
    if jax.process_index() == 0:
        result = fn()
        _sync(f"after {fn.__name__}")
        return result
    _sync(f"after {fn.__name__}")
    return fn()


def record_config(config: Any, path: Path, write: bool) -> None:
    """Write config.json, or check a resumed run against it."""
    current = config.to_dict()
    if path.exists():
        saved = json.loads(path.read_text())
        changed = [
            k
            for k in FIXED_SECTIONS
            if json.dumps(saved.get(k), sort_keys=True)
            != json.dumps(json.loads(json.dumps(current[k])), sort_keys=True)
        ]
        changed += [
            f"train.{k}"
            for k in FIXED_TRAIN_KEYS
            if saved.get("train", {}).get(k) != current["train"][k]
        ]
        if changed:
            raise ConfigError(
                f"{path.parent} holds a run with other settings for {', '.join(changed)}; "
                "use a new --workdir or the same config"
            )
    elif write:
        path.write_text(json.dumps(current, indent=2) + "\n")


def bits_per_byte(nats: float, nbytes: int) -> float:
    return nats / (math.log(2) * nbytes)


def step_costs(lm: LM, state, inputs: np.ndarray, labels: np.ndarray, repeats: int) -> dict:
    """Compiled temporary memory and median time of a train step, fused vs materialised."""
    x, y, scale = lm.put(inputs), lm.put(labels), np.float32(1)
    costs = {}
    for kind in LOSSES:
        compiled = lm.train_step(kind).lower(state, x, y, scale).compile()
        analysis = compiled.memory_analysis()
        times = []
        for _ in range(repeats + 1):
            copy = jax.tree.map(lambda a: a.copy(), state)  # the step donates its input
            jax.block_until_ready(copy)
            start = time.perf_counter()
            jax.block_until_ready(compiled(copy, x, y, scale))
            times.append(time.perf_counter() - start)
        costs[kind] = {
            "temp_bytes": int(analysis.temp_size_in_bytes),
            "argument_bytes": int(analysis.argument_size_in_bytes),
            "seconds": float(np.median(times[1:])),
        }
    return costs


def resume_check(lm, state, checkpoints, streams, losses: dict[int, float], last: int, n: int):
    """Restore the latest checkpoint before ``last`` into fresh state and data iterator,
    re-run up to ``n`` steps, and compare the losses with the ones recorded."""
    earlier = [s for s in checkpoints.steps() if s < last]
    if not earlier:
        return {"from_step": None, "steps": 0, "exact": False, "reason": "no earlier checkpoint"}
    start = earlier[-1]
    restored, data_state = checkpoints.restore(start, lm.abstract_state(state))
    c = lm.config
    batches = lmdata.Batches(streams["train"], c.model.seq_len, c.train.batch_size, c.seed)
    batches.restore(data_state)
    step_fn = lm.train_step()
    rows = []
    for step in range(start + 1, min(start + n, last) + 1):
        x, y = batches.next()
        restored, metrics = step_fn(restored, lm.put(x), lm.put(y), np.float32(1))
        rows.append((step, float(metrics["loss"]), losses.get(step)))
    exact = bool(rows) and all(b is not None and a == b for _, a, b in rows)
    return {"from_step": start, "steps": len(rows), "exact": exact, "losses": rows}


def samples(lm: LM, state, tokenizer, corpus, stream_test: np.ndarray) -> list[dict]:
    """Prompts from the first test documents, continued greedily and at the temperature."""
    r = lm.config.report
    eot = tokenizer.token_to_id(lmdata.EOT)
    starts = np.flatnonzero(stream_test == eot)[: r.samples]
    rows, meta = [], []
    for i, s in enumerate(starts):
        prompt = stream_test[s : s + 1 + r.prompt_tokens]
        for mode, temp in (("greedy", 0.0), (f"temperature {r.temperature:g}", r.temperature)):
            rows.append((prompt, temp))
            meta.append((corpus.files["test"][i], mode, prompt))
    if not rows:
        return []
    seq = lm.config.model.seq_len
    tokens = np.zeros((len(rows), seq), np.int32)
    lengths = np.array([len(p) for p, _ in rows], np.int32)
    for j, (p, _) in enumerate(rows):
        tokens[j, : len(p)] = p
    temps = np.array([t for _, t in rows], np.float32)
    from jax.sharding import PartitionSpec as P

    out = lm.sampler(r.sample_tokens)(
        state, lm.put(tokens, P()), lm.put(lengths, P()), lm.put(temps, P()), lm.config.seed
    )
    out = np.asarray(out)
    result = []
    for j, (source, mode, prompt) in enumerate(meta):
        n = lengths[j]
        result.append(
            {
                "source": source,
                "mode": mode,
                "prompt": tokenizer.decode(prompt[1:].tolist()),
                "continuation": tokenizer.decode(
                    out[j, n : n + r.sample_tokens].tolist(), skip_special_tokens=False
                ),
            }
        )
    return result


def checks(metrics: dict[str, Any], config: Any) -> list[dict[str, Any]]:
    """The issue's bars as rows (check, bar, measured, met), as ``config.bars`` selects: the
    smoke config asks only that the model learns and resumes exactly."""
    b, test = config.bars, metrics["test_bits_per_byte"]
    rows = []
    if b.compressors:
        for key, name in (("zlib", "zlib -9's"), ("unigram", "the unigram model's")):
            rows.append(
                {
                    "check": f"language model: test bits per byte below {name}",
                    "bar": f"< {metrics[f'{key}_bits_per_byte']:.4f}",
                    "measured": f"{test:.4f}",
                    "met": test < metrics[f"{key}_bits_per_byte"],
                }
            )
    else:
        uniform = math.log2(metrics["vocab_size"]) / metrics["test_bytes_per_token"]
        rows.append(
            {
                "check": "language model: learns (test bits per byte below a uniform model's)",
                "bar": f"< {uniform:.4f}",
                "measured": f"{test:.4f}",
                "met": test < uniform,
            }
        )
    check = metrics["resume_check"]
    rows.append(
        {
            "check": "language model: resumed from a checkpoint, same losses",
            "bar": "identical",
            "measured": f"{check['steps']} steps from step {check['from_step']}",
            "met": metrics["resume_exact"],
        }
    )
    if b.seconds:
        rows.append(
            {
                "check": "language model: wall time of the script",
                "bar": f"<= {b.seconds:g} s",
                "measured": f"{metrics['seconds']:.0f} s",
                "met": metrics["seconds"] <= b.seconds,
            }
        )
    if b.memory_ratio and metrics["memory_ratio"] is not None:
        rows.append(
            {
                "check": "language model: fused / materialised train-step temporary memory, "
                f"V={metrics['vocab_size']}",
                "bar": f"<= {b.memory_ratio:g}",
                "measured": f"{metrics['memory_ratio']:.3f}",
                "met": metrics["memory_ratio"] <= b.memory_ratio,
            }
        )
    return rows


def run(config: Any, workdir: str | Path) -> dict[str, Any]:
    """Train (or resume) in ``workdir``; returns the metrics (written to metrics.json).

    Writes config.json, split.json, tokenizer.json, checkpoints/, metrics.jsonl (appended),
    and, once training is done, metrics.json, tables.md and curves.png.
    """
    start_time = time.perf_counter()
    check_config(config, rules(config))
    init_distributed(config.distributed)
    workdir = Path(workdir)
    is_main = jax.process_index() == 0
    if is_main:
        workdir.mkdir(parents=True, exist_ok=True)
    _sync("workdir")
    record_config(config, workdir / "config.json", is_main)
    log = MetricsLog(workdir / "metrics.jsonl", is_main)

    def load_corpus():
        return lmdata.load_corpus(config.data, config.seed, workdir / "split.json")

    corpus = main_process_first(load_corpus)

    def load_tokenizer():
        return lmdata.train_or_load_tokenizer(
            corpus.texts["train"],
            config.tokenizer.vocab_size,
            config.tokenizer.min_frequency,
            workdir / "tokenizer.json",
        )

    tokenizer = main_process_first(load_tokenizer)
    streams = {s: lmdata.encode(tokenizer, corpus.texts[s]) for s in lmdata.SPLITS}

    try:
        mesh = make_mesh(config.mesh.data, config.mesh.model)
    except ValueError as error:
        raise ConfigError(f"bad value for 'config.mesh': {error}") from None
    check_mesh_divides(config, mesh)
    lm = LM(config, config.tokenizer.vocab_size, mesh)
    state = lm.init_state()
    c = config
    batches = lmdata.Batches(streams["train"], c.model.seq_len, c.train.batch_size, c.seed)
    checkpoints = Checkpoints(workdir / "checkpoints", c.checkpoint.max_to_keep)
    start_step = 0
    if checkpoints.steps():
        start_step = checkpoints.steps()[-1]
        state, data_state = checkpoints.restore(start_step, lm.abstract_state(state))
        batches.restore(data_state)
        log(kind="resumed", step=start_step, data=data_state)
    try:
        with StopSignal() as stop:
            result = train_loop(
                lm, state, batches, checkpoints, log, start_step, streams["validation"], stop
            )
        state = result.state
        losses = step_losses(log.records()) if is_main else {}
        if result.stopped or not c.report.final:
            return {
                "stopped": result.stopped,
                "step": result.step,
                "losses": {s: losses[s] for s in sorted(losses)},
                "process_index": jax.process_index(),
                "devices": jax.device_count(),
                "mesh": dict(mesh.shape),
            }
        metrics = finish(
            lm, state, checkpoints, corpus, tokenizer, streams, log, result, losses, start_time
        )
    finally:
        checkpoints.close()
    if is_main:
        out = Workdir.__new__(Workdir)  # Workdir() would truncate metrics.jsonl
        out.path = workdir
        out.write_metrics(metrics)
        out.write_text("tables.md", lmreport.tables(metrics, config))
        out.save_figure(lmreport.curves(log.records(), metrics), "curves.png")
    return metrics


def finish(lm, state, checkpoints, corpus, tokenizer, streams, log, result, losses, start_time):
    """Final evaluation, baselines, resume check, step costs and samples."""
    c = lm.config
    eval_fn = lm.eval_step()
    nbytes = {s: corpus.nbytes(s) for s in ("validation", "test")}
    model_bpb, tokens = {}, {}
    for split in ("validation", "test"):
        nats, count = evaluate(lm, eval_fn, state, streams[split])
        model_bpb[split] = bits_per_byte(nats, nbytes[split])
        tokens[split] = count
        log(kind="final", split=split, nats=nats, tokens=count, bits_per_byte=model_bpb[split])
    compressors = {s: lmdata.compressor_bits_per_byte(corpus.raw_bytes(s)) for s in nbytes}
    unigram = {
        s: lmdata.unigram_bits_per_byte(streams["train"], streams[s], lm.vocab_size, nbytes[s])
        for s in nbytes
    }
    check = resume_check(
        lm, state, checkpoints, streams, losses, result.step, c.report.resume_check_steps
    )
    costs = {}
    if c.report.step_costs:
        x, y = lmdata.Batches(streams["train"], c.model.seq_len, c.train.batch_size, c.seed).next()
        costs = step_costs(lm, state, x, y, c.report.timing_steps)
    params = sum(int(np.prod(a.shape)) for a in lm_param_leaves(lm, state))
    metrics = {
        "test_bits_per_byte": model_bpb["test"],
        "validation_bits_per_byte": model_bpb["validation"],
        "zlib_bits_per_byte": compressors["test"]["zlib"],
        "bz2_bits_per_byte": compressors["test"]["bz2"],
        "lzma_bits_per_byte": compressors["test"]["lzma"],
        "unigram_bits_per_byte": unigram["test"],
        "beats_lzma": model_bpb["test"] < compressors["test"]["lzma"],
        "fused_step_temp_bytes": costs.get("fused", {}).get("temp_bytes"),
        "materialised_step_temp_bytes": costs.get("materialised", {}).get("temp_bytes"),
        "memory_ratio": costs["fused"]["temp_bytes"] / costs["materialised"]["temp_bytes"]
        if costs
        else None,
        "fused_step_seconds": costs.get("fused", {}).get("seconds"),
        "materialised_step_seconds": costs.get("materialised", {}).get("seconds"),
        "vocab_size": lm.vocab_size,
        "parameters": params,
        "steps": result.step,
        "tokens_trained": int(
            sum(
                r["tokens"]
                for r in log.records()
                if r.get("kind") == "train" and r["step"] <= result.step
            )
        )
        if jax.process_index() == 0
        else result.tokens,
        "train_seconds": result.seconds,
        "tokens_per_second": result.tokens / max(result.seconds, 1e-9),
        "resume_exact": check["exact"],
        "resume_check": check,
        "mesh": "x".join(str(v) for v in lm.mesh.shape.values()),
        "devices": jax.device_count(),
        "processes": jax.process_count(),
        "step_costs": costs,
        "compressors": compressors,
        "unigram": unigram,
        "bytes_per_token": {s: nbytes[s] / tokens[s] for s in nbytes},
        "test_bytes_per_token": nbytes["test"] / tokens["test"],
        "tokenizer_round_trips": lmdata.round_trips(tokenizer, corpus.texts["test"]),
        "data": {
            "root": corpus.root,
            "files": {s: len(v) for s, v in corpus.files.items()},
            "bytes": {s: corpus.nbytes(s) for s in lmdata.SPLITS},
            "tokens": {s: len(v) for s, v in streams.items()},
            "skipped_not_utf8": len(corpus.skipped),
        },
        "samples": samples(lm, state, tokenizer, corpus, streams["test"]),
    }
    metrics["seconds"] = time.perf_counter() - start_time
    metrics["checks"] = checks(metrics, c)
    return metrics


def lm_param_leaves(lm: LM, state) -> list:
    """The model's parameter arrays."""
    from flax import nnx

    model, _ = nnx.merge(lm.graphdef, state)
    return jax.tree.leaves(nnx.state(model, nnx.Param))


def run_or_exit(config: Any, workdir: str | Path) -> dict[str, Any]:
    """``run``, then exit status 143 if a SIGTERM stopped it (its checkpoint saved)."""
    metrics = run(config, workdir)
    if metrics.get("stopped") == "preempted":
        print(
            f"language_model: stopped by SIGTERM at step {metrics['step']} with a checkpoint in "
            f"{workdir}; run the same command again to resume",
            file=sys.stderr,
        )
        sys.exit(143)
    return metrics


def main(argv: list[str]) -> None:
    """absl entry point: ``run`` on ``--config`` and ``--workdir``."""
    cli.run_main(argv, run_or_exit, "language_model")


if __name__ == "__main__":
    cli.define_flags(
        "language_model", workdir_help="output folder; one holding checkpoints is resumed"
    )
    app.run(main, flags_parser=cli.parse_flags)
