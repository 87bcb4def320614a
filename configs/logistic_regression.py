"""Binary logistic regression on breast cancer: Optax first-order, optax.lbfgs, Newton vs sklearn.

Launch (defaults, then the tiny test variant, then an override):

    python -m research.logistic_regression --config configs/logistic_regression.py \
        --workdir runs/scripts/logistic_regression
    python -m research.logistic_regression --config configs/logistic_regression.py:smoke \
        --workdir /tmp/lr_smoke
    python -m research.logistic_regression --config configs/logistic_regression.py \
        --config.learning_rate=0.1 --workdir /tmp/lr
"""

import ml_collections


def get_config(arg=None):
    config = ml_collections.ConfigDict()
    config.seed = 0  # train/test split
    config.test_size = 0.25
    config.C = 1.0  # scikit-learn's inverse regularisation strength
    config.solvers = ("adam", "lbfgs", "newton")
    # First-order solver (any entry of `solvers` other than lbfgs / newton).
    config.optimizer = "adam"  # an optax optimiser taking a learning rate: adam, sgd, ...
    config.learning_rate = 0.05
    config.schedule = "cosine"  # or "constant"
    config.steps = 2000
    # Second-order / quasi-Newton solvers stop when ||grad|| <= tol.
    config.tol = 1e-9
    config.lbfgs_max_iter = 500
    config.newton_max_iter = 50
    # scikit-learn reference, on the same objective sum(logloss) + ||w||^2 / (2C).
    config.sklearn_solver = "lbfgs"
    config.sklearn_tol = 1e-10
    config.sklearn_max_iter = 100_000
    config.bar = 1e-6  # lbfgs and Newton must reach sklearn's objective within this (relative)
    config.log_every = 50
    if arg == "smoke":
        config.steps = 200
        config.log_every = 20
    elif arg is not None:
        raise ValueError(f"unknown config variant {arg!r}; use ':smoke' or nothing")
    return config
