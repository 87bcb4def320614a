"""The library's headline claims, measured: fused-loss memory, sharded equality, bfloat16 accuracy.

* **Fused memory**: XLA's temporary memory (``jax.jit(f).lower(...).compile().memory_analysis()``,
  compiled, not run) of the loss + gradients for ``x`` and ``w`` of
  ``xent_jax.linear_softmax_cross_entropy_with_integer_labels`` against materialising ``x @ w``
  and taking optax's loss; the README claims about 1/20.
* **Sharded equality**: the fused loss with ``w`` split along the vocabulary, and the plain loss
  on logits split along the classes, over ``devices`` simulated CPU devices (a child process,
  ``research/common/sharded_claim.py``), against the same calls on one device: relative error
  of the loss and of every gradient.
* **bfloat16 accuracy**: bfloat16 inputs against a float64 reference on the same (upcast)
  values: the plain loss on bfloat16 logits and the fused loss on bfloat16 ``x`` and ``w``
  (float32 accumulation), with optax on the same inputs for comparison.

    python -m research.headline_claims --config configs/headline_claims.py[:smoke] \
        --workdir DIR [--config.KEY=VALUE ...]
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import app

import xent_jax
from research.common import Workdir, check_config, cli, markdown_table
from research.common.config import REPO_ROOT
from research.common.sharded_claim import SETTINGS_VARIABLE


def parse_shape(text: str, size: int) -> tuple[int, ...]:
    shape = tuple(int(part) for part in str(text).lower().split("x"))
    if len(shape) != size or min(shape) < 1:
        raise ValueError(text)
    return shape


def rules(config: Any) -> dict[str, tuple]:
    def shape_of(size):
        return lambda v: bool(parse_shape(v, size))

    return {
        "fused_shape": (shape_of(3), "an NxDxV string"),
        "fused_memory_bar": (lambda v: 0 < v <= 1, "in (0, 1]"),
        "sharded_shape": (shape_of(3), "an NxDxV string"),
        "devices": (lambda v: v >= 2, "at least 2"),
        "sharded_bar": (lambda v: v > 0, "> 0"),
        "bf16_logits_shape": (shape_of(2), "an NxK string"),
        "bf16_fused_shape": (shape_of(3), "an NxDxV string"),
        "bf16_bar": (lambda v: v > 0, "> 0"),
        "timeout_s": (lambda v: v > 0, "> 0"),
    }


def start_sharded_child(config: Any) -> subprocess.Popen:
    """The sharded measurement in a child process with ``config.devices`` CPU devices."""
    env = dict(os.environ)
    flag = f"--xla_force_host_platform_device_count={config.devices}"
    env["XLA_FLAGS"] = f"{env.get('XLA_FLAGS', '')} {flag}".strip()
    env["JAX_PLATFORMS"] = "cpu"
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [env.get("PYTHONPATH"), str(REPO_ROOT)]))
    settings = {"shape": parse_shape(config.sharded_shape, 3), "seed": config.seed}
    env[SETTINGS_VARIABLE] = json.dumps(settings)
    return subprocess.Popen(
        [sys.executable, "-m", "research.common.sharded_claim"],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def finish_sharded_child(child: subprocess.Popen, timeout_s: float) -> dict[str, Any]:
    try:
        stdout, stderr = child.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        child.kill()
        child.communicate()
        raise RuntimeError(f"the sharded measurement took over {timeout_s:g} s") from None
    if child.returncode != 0:
        raise RuntimeError(f"the sharded measurement failed:\n{stderr[-3000:]}")
    return json.loads(stdout.strip().splitlines()[-1])


def fused_memory(shape: tuple[int, int, int]) -> dict[str, Any]:
    """Temporary bytes of the compiled loss + gradients, fused and materialised (not run)."""
    n, d, v = shape
    args = (
        jax.ShapeDtypeStruct((n, d), jnp.float32),
        jax.ShapeDtypeStruct((d, v), jnp.float32),
        jax.ShapeDtypeStruct((n,), jnp.int32),
    )
    losses = {
        "fused": lambda x, w, y: xent_jax.linear_softmax_cross_entropy_with_integer_labels(
            x, w, y, reduction="mean"
        ),
        "materialised": lambda x, w, y: jnp.mean(
            optax.softmax_cross_entropy_with_integer_labels(x @ w, y)
        ),
    }
    out: dict[str, Any] = {"shape": [n, d, v], "logits_bytes": n * v * 4}
    for name, loss in losses.items():
        compiled = jax.jit(jax.value_and_grad(loss, argnums=(0, 1))).lower(*args).compile()
        out[f"{name}_temp_bytes"] = int(compiled.memory_analysis().temp_size_in_bytes)
    out["ratio"] = out["fused_temp_bytes"] / out["materialised_temp_bytes"]
    return out


def _float64_loss(logits: np.ndarray, labels: np.ndarray) -> np.ndarray:
    row_max = logits.max(-1, keepdims=True)
    lse = (row_max + np.log(np.exp(logits - row_max).sum(-1, keepdims=True)))[:, 0]
    return lse - logits[np.arange(len(labels)), labels]


def _max_relative_error(got: Any, reference: np.ndarray) -> float:
    got = np.asarray(jnp.asarray(got, jnp.float32), np.float64)
    return float(np.max(np.abs(got - reference) / np.abs(reference)))


def bfloat16_accuracy(
    logits_shape: tuple[int, int], fused_shape: tuple[int, int, int], seed: int
) -> dict[str, Any]:
    """Max relative error of per-example losses from bfloat16 inputs against float64 on the same
    values: the plain loss on logits, the fused loss on ``x`` and ``w`` (optax for comparison)."""
    keys = jax.random.split(jax.random.key(seed), 5)
    n, k = logits_shape
    logits = (2.0 * jax.random.normal(keys[0], (n, k))).astype(jnp.bfloat16)
    labels = jax.random.randint(keys[1], (n,), 0, k)
    reference = _float64_loss(
        np.asarray(logits.astype(jnp.float32), np.float64), np.asarray(labels)
    )
    out: dict[str, Any] = {
        "logits_shape": [n, k],
        "plain_xent_jax": _max_relative_error(
            jax.jit(xent_jax.softmax_cross_entropy_with_integer_labels)(logits, labels), reference
        ),
        "plain_optax": _max_relative_error(
            jax.jit(optax.softmax_cross_entropy_with_integer_labels)(logits, labels), reference
        ),
    }
    n, d, v = fused_shape
    x = jax.random.normal(keys[2], (n, d)).astype(jnp.bfloat16)
    w = (jax.random.normal(keys[3], (d, v)) * (2.0 / np.sqrt(d))).astype(jnp.bfloat16)
    labels = jax.random.randint(keys[4], (n,), 0, v)
    up = lambda a: np.asarray(a.astype(jnp.float32), np.float64)
    reference = _float64_loss(up(x) @ up(w), np.asarray(labels))
    fused = jax.jit(xent_jax.linear_softmax_cross_entropy_with_integer_labels)
    materialised = jax.jit(
        lambda x, w, y: optax.softmax_cross_entropy_with_integer_labels(x @ w, y)
    )
    out["fused_shape"] = [n, d, v]
    out["fused_xent_jax"] = _max_relative_error(fused(x, w, labels), reference)
    out["fused_materialised_optax"] = _max_relative_error(materialised(x, w, labels), reference)
    return out


def claim_rows(memory: dict, sharded: dict, bf16: dict, config: Any) -> list[dict[str, Any]]:
    """One row per claim: claim, setting, measured, bar, met."""
    mib = lambda b: f"{b / 2**20:.0f} MiB"
    n, d, v = memory["shape"]
    rows = [
        {
            "claim": "fused loss + gradients: temporary memory / materialised x @ w + optax",
            "setting": f"N={n}, D={d}, V={v}, float32 (memory_analysis)",
            "value": memory["ratio"],
            "measured": f"{memory['ratio']:.3f} ({mib(memory['fused_temp_bytes'])} vs "
            f"{mib(memory['materialised_temp_bytes'])})",
            "bar": f"<= 1/{1 / config.fused_memory_bar:.3g}",
            "met": memory["ratio"] <= config.fused_memory_bar,
        }
    ]
    n, d, v = sharded["shape"]
    for case, what in (
        ("fused", "fused loss, w split along V"),
        ("logits", "logits split along K"),
    ):
        worst = max(sharded[case].values())
        parts = ", ".join(f"{k} {e:.1e}" for k, e in sharded[case].items())
        rows.append(
            {
                "claim": f"vocab-sharded = single device ({what}): values and gradients",
                "setting": f"{sharded['device_count']} CPU devices, N={n}, D={d}, V={v}, "
                "ignore_index + smoothing + z-loss",
                "value": worst,
                "measured": f"max rel. error {worst:.1e} ({parts})",
                "bar": f"<= {config.sharded_bar:g}",
                "met": worst <= config.sharded_bar and sharded["device_count"] == config.devices,
            }
        )
    n, k = bf16["logits_shape"]
    rows.append(
        {
            "claim": "bfloat16 logits: loss vs float64 reference (max rel. error)",
            "setting": f"N={n}, K={k}",
            "value": bf16["plain_xent_jax"],
            "measured": f"{bf16['plain_xent_jax']:.1e} (optax {bf16['plain_optax']:.1e})",
            "bar": f"<= {config.bf16_bar:g}",
            "met": bf16["plain_xent_jax"] <= config.bf16_bar,
        }
    )
    n, d, v = bf16["fused_shape"]
    rows.append(
        {
            "claim": "bfloat16 x and w, fused loss vs float64 reference (max rel. error)",
            "setting": f"N={n}, D={d}, V={v}",
            "value": bf16["fused_xent_jax"],
            "measured": f"{bf16['fused_xent_jax']:.1e} (bfloat16 x @ w + optax "
            f"{bf16['fused_materialised_optax']:.1e})",
            "bar": f"<= {config.bf16_bar:g}",
            "met": bf16["fused_xent_jax"] <= config.bf16_bar,
        }
    )
    return rows


def run(config: Any, workdir: str | Path) -> dict[str, Any]:
    """Measures the three claims; writes config.json, metrics.json and tables.md to ``workdir``
    and returns the metrics."""
    check_config(config, rules(config))
    out = Workdir(workdir)
    out.write_config(config)
    start = time.perf_counter()
    child = start_sharded_child(config)  # runs while this process measures the rest
    try:
        memory = fused_memory(parse_shape(config.fused_shape, 3))
        bf16 = bfloat16_accuracy(
            parse_shape(config.bf16_logits_shape, 2),
            parse_shape(config.bf16_fused_shape, 3),
            config.seed,
        )
    except BaseException:
        child.kill()
        child.communicate()
        raise
    sharded = finish_sharded_child(child, config.timeout_s)
    rows = claim_rows(memory, sharded, bf16, config)
    metrics = {
        "all_bars_met": all(r["met"] for r in rows),
        "claims": rows,
        "fused_memory": memory,
        "sharded": sharded,
        "bfloat16": bf16,
        "wall_time_s": time.perf_counter() - start,
    }
    out.log(**{k: v for k, v in metrics.items() if k != "claims"})
    out.write_metrics(metrics)
    out.write_text(
        "tables.md",
        "Each row measured in this run (`research/headline_claims.py`). Memory: XLA's temporary "
        "buffers of the compiled loss + gradients for x and w. Sharded: relative error "
        "(max |a - b| / max |b|) of the loss and each gradient against one device. bfloat16: "
        "max over examples of |loss - reference| / reference, the reference in float64 on "
        "the same bfloat16 values.\n\n"
        + markdown_table(rows, ["claim", "setting", "measured", "bar", "met"]),
    )
    return metrics


def main(argv: list[str]) -> None:
    """absl entry point: ``run`` on ``--config`` and ``--workdir``."""
    cli.run_main(argv, run, "headline_claims")


if __name__ == "__main__":
    cli.define_flags("headline_claims")
    app.run(main, flags_parser=cli.parse_flags)
