"""The seed articles' worked examples recomputed with xent_jax (bits and nats), figures redrawn.

Launch (defaults, then the tiny test variant):

    python -m research.seed_examples --config configs/seed_examples.py \
        --workdir runs/scripts/seed_examples
    python -m research.seed_examples --config configs/seed_examples.py:smoke \
        --workdir /tmp/seeds_smoke
"""

import ml_collections


def get_config(arg=None):
    config = ml_collections.ConfigDict()
    config.points = 400  # resolution of the curves in the figures
    if arg == "smoke":
        config.points = 50
    elif arg is not None:
        raise ValueError(f"unknown config variant {arg!r}; use ':smoke' or nothing")
    return config
