"""Gradient check of every xent_jax loss: jax.grad / jax.hessian vs closed forms, float32/64.

Launch (defaults, then the tiny test variant, then an override):

    python -m research.gradcheck --config configs/gradcheck.py --workdir runs/scripts/gradcheck
    python -m research.gradcheck --config configs/gradcheck.py:smoke --workdir /tmp/gc_smoke
    python -m research.gradcheck --config configs/gradcheck.py --config.logit_scale=10 \
        --workdir /tmp/gc
"""

import ml_collections


def get_config(arg=None):
    config = ml_collections.ConfigDict()
    config.seed = 0
    config.batch = 6
    config.num_classes = 5
    config.logit_scale = 3.0  # logits ~ N(0, logit_scale^2)
    config.dtypes = ("float32", "float64")
    config.reductions = ("none", "sum", "mean")
    # Relative-error bars (the rtol of the test suite's tolerance table, tests/tolerances.py).
    config.tol_float32 = 2e-5
    config.tol_float64 = 1e-10
    config.fd_step = 1e-6  # central differences for the losses without a closed form
    config.fd_tol = 1e-6
    if arg == "smoke":
        config.batch = 4
        config.num_classes = 3
        config.reductions = ("sum", "mean")
    elif arg is not None:
        raise ValueError(f"unknown config variant {arg!r}; use ':smoke' or nothing")
    return config
