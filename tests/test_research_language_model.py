"""End-to-end: research.language_model on its smoke config.

One uninterrupted run on one device is the reference. Against it: a run stopped by a real
SIGTERM and resumed, then crashed by an injected exception and resumed again, gives exactly the
same per-step losses; a 2 data x 4 model mesh (8 simulated CPU devices) and two processes joined
by ``jax.distributed`` give the same losses within float32 tolerance; a NaN objective stops the
run with the last good checkpoint kept.

Every run is a child process (the script's command line) sharing one persistent compilation
cache, so that the identical programs of the reference, the killed and the resumed runs are
compiled once; this process's JAX configuration is left alone.
"""

from __future__ import annotations

import json
import math
import os
import signal
import socket
import subprocess
import sys
import time
import zlib
from pathlib import Path

import jax
import numpy as np
import pytest

from research.common import get_config
from research.common.report import bars, summarize
from research.lm.data import IGNORE, Batches, windows
from research.lm.train import MetricsLog, step_losses

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parent.parent
# Relative difference of the first steps' losses between meshes / processes (float32: the
# sharded programs sum in other orders).
REL = 1e-5
SHARDED_STEPS = 4


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("jax_cache")


def child_env(devices: int, cache: Path) -> dict[str, str]:
    env = dict(os.environ)
    env["XLA_FLAGS"] = (
        env.get("XLA_FLAGS", "") + f" --xla_force_host_platform_device_count={devices}"
    ).strip()
    env["JAX_PLATFORMS"] = "cpu"
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    env["JAX_COMPILATION_CACHE_DIR"] = str(cache)
    env["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
    env["JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES"] = "0"
    return env


def run_cli(workdir: Path, cache: Path, *overrides: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        cli(workdir, *overrides),
        cwd=ROOT,
        env=child_env(1, cache),
        capture_output=True,
        text=True,
        timeout=600,
    )


def cli(workdir: Path, *overrides: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "research.language_model",
        "--config",
        "configs/language_model.py:smoke",
        "--workdir",
        str(workdir),
        *overrides,
    ]


def records(workdir: Path) -> list[dict]:
    return MetricsLog(workdir / "metrics.jsonl", enabled=False).records()


@pytest.fixture(scope="module")
def reference(tmp_path_factory, cache):
    workdir = tmp_path_factory.mktemp("lm_reference")
    proc = run_cli(workdir, cache)
    assert proc.returncode == 0, proc.stderr[-5000:]
    assert f"language_model: results in {workdir}" in proc.stdout
    metrics = json.loads((workdir / "metrics.json").read_text())
    return metrics, workdir, get_config("language_model", "smoke")


def test_writes_every_output(reference):
    _, workdir, config = reference
    for name in ("config.json", "split.json", "tokenizer.json", "metrics.json", "tables.md"):
        assert (workdir / name).stat().st_size > 0, name
    assert (workdir / "curves.png").stat().st_size > 10_000
    losses = step_losses(records(workdir))
    assert sorted(losses) == list(range(1, config.train.steps + 1))
    evals = [r for r in records(workdir) if r["kind"] == "eval"]
    assert [r["step"] for r in evals] == [20, 40]
    tables = (workdir / "tables.md").read_text()
    assert "zlib -9" in tables and "Sample (greedy)" in tables


def test_summary_has_the_issue_keys(reference):
    metrics = reference[0]
    summary = summarize("language_model", metrics)
    for key in (
        "test_bits_per_byte",
        "zlib_bits_per_byte",
        "bz2_bits_per_byte",
        "lzma_bits_per_byte",
        "unigram_bits_per_byte",
        "fused_step_temp_bytes",
        "materialised_step_temp_bytes",
        "vocab_size",
        "tokens_trained",
        "resume_exact",
        "seconds",
    ):
        assert key in summary, key
    json.dumps(summary)
    assert summary["vocab_size"] == 2048
    train = [r for r in records(reference[1]) if r["kind"] == "train"]
    assert summary["tokens_trained"] == sum(r["tokens"] for r in train) > 0.9 * 40 * 8 * 64
    rows = bars("language_model", metrics)
    assert rows and all(row["met"] for row in rows), rows


def test_bits_per_byte_are_measured_on_the_raw_test_bytes(reference):
    metrics, workdir, _ = reference
    split = json.loads((workdir / "split.json").read_text())
    root = Path(split["root"])
    data = b"".join((root / name).read_bytes() for name in split["files"]["test"])
    assert len(data) == split["bytes"]["test"] == metrics["data"]["bytes"]["test"]
    assert metrics["zlib_bits_per_byte"] == pytest.approx(
        8 * len(zlib.compress(data, 9)) / len(data)
    )
    final = next(r for r in records(workdir) if r["kind"] == "final" and r["split"] == "test")
    assert metrics["test_bits_per_byte"] == pytest.approx(
        final["nats"] / (math.log(2) * len(data)), rel=1e-12
    )
    # Every test token after the first is predicted: the stream is EOT + tokens per file.
    assert final["tokens"] == metrics["data"]["tokens"]["test"] - 1
    assert metrics["tokenizer_round_trips"] is True
    # The model learnt: far below a uniform distribution over the vocabulary, and its
    # validation loss fell.
    uniform = math.log2(2048) / metrics["test_bytes_per_token"]
    assert metrics["test_bits_per_byte"] < 0.9 * uniform
    evals = [r["val_loss"] for r in records(workdir) if r["kind"] == "eval"]
    assert evals[-1] < evals[0] < math.log(2048)


def test_split_is_by_file_and_disjoint(reference):
    split = json.loads((reference[1] / "split.json").read_text())["files"]
    names = [set(split[s]) for s in ("train", "validation", "test")]
    assert all(names) and not (names[0] & names[1] or names[0] & names[2] or names[1] & names[2])
    assert len(names[0]) + len(names[1]) + len(names[2]) == 40


def test_resume_check_inside_the_run(reference):
    check = reference[0]["resume_check"]
    assert reference[0]["resume_exact"] is True
    assert check["from_step"] == 30 and check["steps"] == 5
    assert all(a == b for _, a, b in check["losses"])


def test_step_costs_measured_for_both_losses(reference):
    costs = reference[0]["step_costs"]
    for kind in ("fused", "materialised"):
        assert costs[kind]["temp_bytes"] > 0 and costs[kind]["seconds"] > 0


def test_batches_pad_the_last_window_and_batch_and_resume_in_place():
    stream = np.arange(1, 24, dtype=np.int32)  # 23 tokens: 22 targets in 3 windows of 8
    inputs, labels = windows(stream, 8)
    assert inputs.shape == labels.shape == (3, 8)
    assert (labels[inputs != 0] == inputs[inputs != 0] + 1).all()
    assert (labels == IGNORE).sum() == 2 and (labels[-1, -2:] == IGNORE).all()
    batches = Batches(stream, 8, 2, seed=3)
    seen = [batches.next() for _ in range(2)]  # epoch 0: 2 rows, then 1 row + 1 padding row
    assert (seen[1][1][1] == IGNORE).all() and batches.state()["epoch"] == 1
    epoch0 = np.concatenate([seen[0][0], seen[1][0][:1]])
    assert sorted(map(tuple, epoch0)) == sorted(map(tuple, inputs))
    state = batches.state()
    ahead = [batches.next() for _ in range(3)]
    again = Batches(stream, 8, 2, seed=3)
    again.restore(state)
    for (x, y), (x2, y2) in zip(ahead, (again.next() for _ in range(3)), strict=True):
        assert (x == x2).all() and (y == y2).all()
    with pytest.raises(ValueError, match="seed"):
        Batches(stream, 8, 2, seed=4).restore(state)


def _wait_for_step(workdir: Path, step: int, proc: subprocess.Popen, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"child exited early ({proc.returncode}): {proc.stderr.read()[-3000:]}")
        path = workdir / "metrics.jsonl"
        lines = path.read_text().splitlines() if path.exists() else []
        if any(f'"kind": "train", "step": {step}' in line for line in lines):
            return
        time.sleep(0.05)
    proc.kill()
    pytest.fail(f"no step {step} within {timeout} s")


def test_sigterm_and_crash_then_resume_give_the_same_losses(reference, cache, tmp_path):
    ref_losses = step_losses(records(reference[1]))
    workdir = tmp_path / "killed"
    # 1. A real SIGTERM mid-run: the run checkpoints the step it is at and exits with 143.
    proc = subprocess.Popen(
        cli(workdir), cwd=ROOT, env=child_env(1, cache), stderr=subprocess.PIPE, text=True
    )
    _wait_for_step(workdir, 5, proc, timeout=300)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 143, err[-3000:]
    stopped = [r for r in records(workdir) if r["kind"] == "preempted"]
    assert len(stopped) == 1, err[-3000:]
    killed_at = stopped[0]["step"]
    assert 5 <= killed_at < 40
    assert (workdir / "checkpoints" / str(killed_at)).is_dir()
    # 2. Resumed, then an exception after step 33 (checkpoints at 10, 20, 30 only): a crash.
    crash_at = 33 if killed_at < 33 else killed_at + 1
    proc = run_cli(workdir, cache, f"--config.debug.fail_after_step={crash_at}")
    assert proc.returncode != 0 and "InjectedFailure" in proc.stderr, proc.stderr[-3000:]
    # 3. Resumed from the last checkpoint before the crash, to the end.
    proc = run_cli(workdir, cache, "--config.report.final=false")
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = records(workdir)
    resumed = [r["step"] for r in lines if r["kind"] == "resumed"]
    assert resumed == [killed_at, max(s for s in (10, 20, 30, killed_at) if s <= crash_at)]
    # Never overwritten: the steps run twice are logged twice, with the same losses.
    seen: dict[int, list[float]] = {}
    for r in lines:
        if r["kind"] == "train":
            seen.setdefault(r["step"], []).append(r["loss"])
    assert any(len(v) > 1 for v in seen.values())
    assert all(len(set(v)) == 1 for v in seen.values()), seen
    got = step_losses(lines)
    differ = {
        k: (got.get(k), ref_losses.get(k))
        for k in set(got) | set(ref_losses)
        if got.get(k) != ref_losses.get(k)
    }
    assert not differ, (differ, [(r["kind"], r.get("step")) for r in lines if r["kind"] != "train"])


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(cache, tmp_path):
    import orbax.checkpoint as ocp

    proc = run_cli(tmp_path, cache, "--config.debug.nan_after_step=13")
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert "at step 14" in proc.stderr and "last good checkpoint kept" in proc.stderr
    lines = records(tmp_path)
    assert max(r["step"] for r in lines if r["kind"] == "train") == 13
    assert [r["step"] for r in lines if r["kind"] == "stopped"] == [14]
    steps = sorted(int(p.name) for p in (tmp_path / "checkpoints").iterdir() if p.name.isdigit())
    assert steps == [10]
    state = ocp.StandardCheckpointer().restore(tmp_path / "checkpoints" / "10" / "state")
    leaves = [np.asarray(x) for x in jax.tree.leaves(state)]
    assert leaves and all(np.isfinite(x).all() for x in leaves if x.dtype.kind == "f")


def _losses(obj: dict) -> list[float]:
    return [obj[str(s)] for s in range(1, SHARDED_STEPS + 1)]


def _rel(a: list[float], b: list[float]) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.max(np.abs(a - b) / np.abs(b)))


def test_two_by_four_mesh_matches_one_device(reference, cache, tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "tests.lm_child", "sharded", str(tmp_path), str(SHARDED_STEPS)],
        cwd=ROOT,
        env=child_env(8, cache),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-5000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["devices"] == 8 and out["mesh"] == {"data": 2, "model": 4}
    ref = step_losses(records(reference[1]))
    one, mesh = [ref[s] for s in range(1, SHARDED_STEPS + 1)], _losses(out["losses"])
    assert _rel(mesh, one) <= REL, (mesh, one)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_match_one_process(reference, cache, tmp_path):
    port = _free_port()
    procs = [
        subprocess.Popen(
            [
                sys.executable,
                "-m",
                "tests.lm_child",
                "process",
                str(tmp_path),
                str(SHARDED_STEPS),
                str(i),
                str(port),
            ],
            cwd=ROOT,
            env=child_env(4, cache),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for i in range(2)
    ]
    outs = []
    try:
        for proc in procs:
            out, err = proc.communicate(timeout=600)
            assert proc.returncode == 0, err[-5000:]
            outs.append(json.loads(out.strip().splitlines()[-1]))
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
    assert [o["process_index"] for o in outs] == [0, 1]
    assert all(o["processes"] == 2 and o["devices"] == 8 and o["local_devices"] == 4 for o in outs)
    ref = step_losses(records(reference[1]))
    assert _rel(_losses(outs[0]["losses"]), [ref[s] for s in range(1, SHARDED_STEPS + 1)]) <= REL
