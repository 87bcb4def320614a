"""The language model's tables.md and curves.png (read into ``runs/latest/report.md``)."""

from __future__ import annotations

from typing import Any

import matplotlib.pyplot as plt
import numpy as np

from research.common import markdown_table

MIB = 2.0**20


def curves(records: list[dict], metrics: dict[str, Any]) -> plt.Figure:
    """Train loss per step (and its running mean), validation loss at the evaluations, and
    the test bits per byte against the compressors and the unigram model."""
    train = {r["step"]: r["loss"] for r in records if r.get("kind") == "train"}
    evals = {r["step"]: r["val_loss"] for r in records if r.get("kind") == "eval"}
    fig, (ax, bx) = plt.subplots(1, 2, figsize=(12, 4), gridspec_kw={"width_ratios": [3, 2]})
    steps = np.array(sorted(train))
    losses = np.array([train[s] for s in steps])
    if len(steps):
        ax.plot(steps, losses, color="C0", alpha=0.3, lw=0.8, label="train (per step)")
        k = max(1, len(steps) // 50)
        smooth = np.convolve(losses, np.ones(k) / k, mode="valid")
        ax.plot(steps[k - 1 :], smooth, color="C0", label=f"train (mean of {k})")
    if evals:
        es = sorted(evals)
        ax.plot(es, [evals[s] for s in es], "o-", color="C1", label="validation")
    unigram_nats = metrics["unigram_bits_per_byte"] * np.log(2) * metrics["test_bytes_per_token"]
    ax.axhline(unigram_nats, color="grey", ls=":", label="unigram model (test)")
    ax.set(xlabel="step", ylabel="nats per token", title="Loss (fused, with z-loss)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    names = ["model", "zlib -9", "bz2 -9", "xz -9", "unigram"]
    keys = ["test", "zlib", "bz2", "lzma", "unigram"]
    values = [metrics[f"{k}_bits_per_byte"] for k in keys]
    bx.bar(names, values, color=["C0", "C7", "C7", "C7", "C3"])
    for i, v in enumerate(values):
        bx.text(i, v, f"{v:.3f}", ha="center", va="bottom", fontsize=8)
    bx.set(ylabel="bits per byte", title="Test split, same bytes")
    bx.grid(alpha=0.3, axis="y")
    return fig


def tables(metrics: dict[str, Any], config: Any) -> str:
    """tables.md: data, bits per byte, step costs, training, samples."""
    m, d = config.model, metrics["data"]
    lines = [
        f"Decoder-only transformer (Flax NNX; D={m.dim}, {m.layers} layers, {m.heads} heads, "
        f"MLP {m.mlp_hidden}, context {m.seq_len}, {m.positions} positions, "
        f"{'tied' if m.tie_embeddings else 'untied'} embeddings, {metrics['parameters']:,} "
        f"parameters) trained with `xent_jax.linear_softmax_cross_entropy_with_integer_labels` "
        f"(z-loss {config.train.z_loss:g}) on a {metrics['mesh']} mesh; byte-level BPE with "
        f"{metrics['vocab_size']} tokens trained on the training split. Data: "
        f"`{d['root']}` ({d['files']['train']} / {d['files']['validation']} / "
        f"{d['files']['test']} files, {d['bytes']['train']:,} / {d['bytes']['validation']:,} "
        f"/ {d['bytes']['test']:,} bytes for train / validation / test; split by file, seed "
        f"{config.seed}, recorded in split.json).",
        "",
        "Bits per byte: total nats over the split's tokens / (ln 2 x its raw UTF-8 bytes); the "
        "compressors see the same bytes; the unigram model (add-one smoothing) is fitted on the "
        "training tokens.",
        "",
    ]
    rows = [
        {
            "split": split,
            "model": metrics[f"{key}_bits_per_byte"],
            "zlib -9": metrics["compressors"][split]["zlib"],
            "bz2 -9": metrics["compressors"][split]["bz2"],
            "xz -9": metrics["compressors"][split]["lzma"],
            "unigram": metrics["unigram"][split],
            "bytes per token": metrics["bytes_per_token"][split],
        }
        for split, key in (("validation", "validation"), ("test", "test"))
    ]
    lines += [markdown_table(rows, float_format=".4f"), ""]
    costs = metrics["step_costs"]
    if costs:
        rows = [
            {
                "loss": kind,
                "temp MiB (memory_analysis)": c["temp_bytes"] / MIB,
                "step ms (median)": 1e3 * c["seconds"],
            }
            for kind, c in costs.items()
        ]
        lines += [
            f"One train step (forward, backward, AdamW) at batch {config.train.batch_size} x "
            f"{m.seq_len} tokens and V={metrics['vocab_size']}: fused / materialised temporary "
            f"memory = {metrics['memory_ratio']:.3f}.",
            "",
            markdown_table(rows, float_format=".1f"),
            "",
        ]
    check = metrics["resume_check"]
    lines += [
        f"Trained {metrics['steps']} steps, {metrics['tokens_trained']:,} tokens in "
        f"{metrics['train_seconds']:.0f} s ({metrics['tokens_per_second']:.0f} tokens/s); the "
        f"whole script took {metrics['seconds']:.0f} s. Resume check: restored step "
        f"{check['from_step']} from its checkpoint and re-ran {check['steps']} steps: "
        f"{'identical losses' if metrics['resume_exact'] else 'DIFFERENT losses'}.",
        "",
    ]
    for sample in metrics["samples"]:
        lines += [
            f"Sample ({sample['mode']}), prompt from {sample['source']}:",
            "",
            "````text",
            sample["prompt"] + "⟨" + sample["continuation"] + "⟩",
            "````",
            "",
        ]
    return "\n".join(lines)
