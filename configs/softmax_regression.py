"""Multinomial logistic regression on iris and digits: Optax, optax.lbfgs, Newton vs sklearn.

Launch (defaults, then the tiny test variant, then an override):

    python -m research.softmax_regression --config configs/softmax_regression.py \
        --workdir runs/scripts/softmax_regression
    python -m research.softmax_regression --config configs/softmax_regression.py:smoke \
        --workdir /tmp/sm_smoke
    python -m research.softmax_regression --config configs/softmax_regression.py \
        --config.datasets=iris --config.C=0.5 --workdir /tmp/sm
"""

import ml_collections


def get_config(arg=None):
    config = ml_collections.ConfigDict()
    config.seed = 0  # train/test split
    config.test_size = 0.25
    config.datasets = ("iris", "digits")
    config.C = 1.0  # scikit-learn's inverse regularisation strength
    config.solvers = ("adam", "lbfgs", "newton")
    config.optimizer = "adam"
    config.learning_rate = 0.05
    config.schedule = "cosine"
    config.steps = 2000
    config.tol = 1e-9
    config.lbfgs_max_iter = 1000
    config.newton_max_iter = 50
    config.sklearn_solver = "lbfgs"
    config.sklearn_tol = 1e-10
    config.sklearn_max_iter = 100_000
    config.bar = 1e-6
    config.log_every = 50
    if arg == "smoke":
        config.steps = 200
        config.log_every = 20
        config.datasets = ("iris",)  # digits' 650x650 Newton Hessian is the slow part
    elif arg is not None:
        raise ValueError(f"unknown config variant {arg!r}; use ':smoke' or nothing")
    return config
