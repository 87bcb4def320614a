"""Benchmark of the losses against optax, jax.numpy and PyTorch, with limits from the same run.

Launch (full: ``make bench``; quick, under 2 minutes on 2 CPU cores: ``make bench-quick``; the
fused linear loss against materialising ``x @ w``: ``make bench-fused``):

    python -m research.benchmark --config configs/benchmark.py
    python -m research.benchmark --config configs/benchmark.py:quick
    python -m research.benchmark --config configs/benchmark.py:fused
    python -m research.benchmark --config configs/benchmark.py:quick --workdir /tmp/bench \
        --config.repeats=3 --config.dtypes=float32
    # compute only: gradients written into donated copies of the logits (no page faults)
    python -m research.benchmark --config configs/benchmark.py --config.donate_logits=True

Shapes are ``"NxK"`` strings (``"NxDxV"`` for the fused linear loss), e.g.
``--config.shapes.softmax_int=1024x8192,8192x32768``; a list is comma-separated or a tuple
literal (``--config.dtypes="('float32',)"``). Groups whose inputs would not fit in
``memory_fraction`` of the available memory are skipped (and listed as such). Results go to
``--workdir`` (default ``bench_runs/<stamp>/``).
"""

import ml_collections


def get_config(arg=None):
    config = ml_collections.ConfigDict()
    config.seed = 0
    config.losses = ("softmax_int", "softmax_dense", "sigmoid", "linear_softmax_int")
    config.modes = ("fwd", "fwd_bwd")
    config.dtypes = ("float32", "bfloat16")
    config.implementations = (
        "xent_jax",
        "xent_jax[options]",  # ignore_index + label smoothing + z-loss (integer labels only)
        "xent_jax[unfused]",  # fused-loss group: x @ w, then the xent_jax loss
        "xent_jax[ignore_index]",  # fused-loss group: with ignore_index, no row ignored
        "xent_jax[half-ignored]",  # ... and with half the rows' labels = ignore_index
        "optax",
        "jnp",
        "torch",  # skipped when PyTorch is not installed
    )
    # Also available: "jnp[no-shift]" (integer labels only), the fastest formulation XLA is
    # given and unsafe outside the float32 exp range; a reference point for the speed bars.
    # "ffi[no-shift]": the same forward with the gradient pass from a hand-written C++ XLA FFI
    # kernel (float32 on CPU; built on first use with the C++ compiler on PATH); "ffi" and
    # "ffi[options]" both passes from kernels (max-shifted statistics), "ffi[hinted]" and
    # "ffi[hinted+options]" with the statistics around the label logit
    # (research/bench/ffi_kernel.py).
    config.options = ml_collections.ConfigDict(
        {"ignore_index": -100, "label_smoothing": 0.1, "z_loss": 1e-4}
    )
    # From small to language-model sized; the largest are skipped if memory is short.
    config.shapes = ml_collections.ConfigDict(
        {
            "softmax_int": ("256x1024", "1024x8192", "2048x32768", "8192x32768", "4096x131072"),
            "softmax_dense": ("256x1024", "1024x8192", "2048x32768", "8192x32768"),
            "sigmoid": ("256x1024", "1024x8192", "2048x32768", "8192x32768"),
            "linear_softmax_int": ("256x128x1024", "1024x256x8192", "4096x512x32768"),
        }
    )
    # The shape of the speed bars (integer-label softmax CE); bfloat16 accuracy rows.
    config.bar_shape = "8192x32768"
    config.accuracy_rows = 1024
    config.repeats = 11
    config.warmup = 2
    # GPU/TPU only: a repeat is back-to-back calls lasting about this long (at most
    # max_calls_per_repeat), so that the host's dispatch and wait are not timed (CPU: one call).
    config.accelerator_batch_ms = 25.0
    config.max_calls_per_repeat = 64
    config.rotation_mib = 64  # distinct input sets cover at least this much (beyond the L3)
    config.max_inputs = 8
    config.memory_fraction = 0.6
    config.reference_kernels = True
    # True: forward + backward (and the (copy) limit) take a fresh copy of the logits as a
    # donated buffer and may write the gradient into it, so the allocation of a fresh output
    # (on CPU: page faults, ~300 ms per GiB on the 2-core VM) is not timed; compute only.
    config.donate_logits = False
    config.torch_threads = 0  # 0: PyTorch's default
    # PyTorch's bfloat16 matmul on CPU is ~100x slower than float32 here (7.6 s for
    # 1024x256 @ 256x8192): left out of the bfloat16 fused-loss groups unless asked for.
    config.torch_bfloat16_matmul = False
    config.plots = True
    # The fused linear loss's bars (loss + gradients for x and w, float32, CPU), at each shape
    # that was timed: time / materialised (x @ w, then optax's or xent_jax's plain loss) at most
    # `time` (one target per shape), temporary memory / materialised at most `memory`, and half
    # the rows ignored / none ignored at most `half_ignored`. On a GPU/TPU the time and memory
    # targets are `accelerator_time` and `accelerator_memory`.
    config.fused_bars = ml_collections.ConfigDict(
        {
            "shapes": ("8192x512x32768", "2048x1024x65536"),
            "time": (0.9, 1.0),
            "memory": 1 / 32,
            "half_ignored": 0.65,
            "accelerator_time": 1.0,
            "accelerator_memory": 1 / 20,
        }
    )
    if arg == "quick":
        config.shapes = ml_collections.ConfigDict(
            {
                "softmax_int": ("256x2048", "1024x16384"),
                "softmax_dense": ("512x8192",),
                "sigmoid": ("512x8192",),
                "linear_softmax_int": ("1024x128x8192",),
            }
        )
        config.bar_shape = "1024x16384"
        config.accuracy_rows = 256
        config.repeats = 5
        config.warmup = 1
        config.rotation_mib = 16
        config.fused_bars.shapes = ("1024x128x8192",)
        config.fused_bars.time = (0.9,)
    elif arg == "fused":
        # The fused loss's bars only: loss + gradients, float32, the two shapes of the bars.
        config.losses = ("linear_softmax_int",)
        config.modes = ("fwd_bwd",)
        config.dtypes = ("float32",)
        config.implementations = (
            "xent_jax",
            "xent_jax[ignore_index]",
            "xent_jax[half-ignored]",
            "xent_jax[unfused]",
            "optax",
        )
        config.shapes.linear_softmax_int = config.fused_bars.shapes
        config.repeats = 5
        config.warmup = 1
        config.plots = False
    elif arg is not None:
        raise ValueError(f"unknown config variant {arg!r}; use ':quick', ':fused' or nothing")
    return config
