"""The library's headline claims measured: fused memory, sharded equality, bfloat16 accuracy.

Launch (defaults, then the tiny test variant, then an override):

    python -m research.headline_claims --config configs/headline_claims.py \
        --workdir runs/scripts/headline_claims
    python -m research.headline_claims --config configs/headline_claims.py:smoke \
        --workdir /tmp/claims_smoke
    python -m research.headline_claims --config configs/headline_claims.py \
        --workdir /tmp/claims --config.devices=8
"""

import ml_collections


def get_config(arg=None):
    config = ml_collections.ConfigDict()
    config.seed = 0
    # Compiled, not run: the README's shape (N x D x V), whose logits take 1 GiB in float32.
    config.fused_shape = "8192x512x32768"
    config.fused_memory_bar = 1 / 20  # the README: about 1/20 of the temporary memory
    # Vocab-sharded vs one device, in a child process with this many simulated CPU devices.
    config.devices = 4
    config.sharded_shape = "256x64x4096"
    config.sharded_bar = 1e-5  # relative error (the tolerance of tests/test_sharding.py)
    # bfloat16 inputs vs a float64 reference on the same values.
    config.bf16_logits_shape = "512x32768"
    config.bf16_fused_shape = "512x256x16384"
    config.bf16_bar = 1e-3  # max relative error of a per-example loss
    config.timeout_s = 300.0  # the child process
    if arg == "smoke":
        config.sharded_shape = "64x16x1024"
        config.bf16_logits_shape = "128x8192"
        config.bf16_fused_shape = "128x64x4096"
    elif arg is not None:
        raise ValueError(f"unknown config variant {arg!r}; use ':smoke' or nothing")
    return config
