"""Flax NNX classifiers (an MLP and a small CNN) on the 8x8 digits, trained with xent_jax losses
(label smoothing on) through ``nnx.Optimizer(model, tx, wrt=nnx.Param)``.

Launch (defaults, then the tiny test variant, then an override):

    python -m research.flax_classifier --config configs/flax_classifier.py \
        --workdir runs/scripts/flax_classifier
    python -m research.flax_classifier --config configs/flax_classifier.py:smoke \
        --workdir /tmp/flax_smoke
    python -m research.flax_classifier --config configs/flax_classifier.py \
        --config.models=mlp --config.learning_rate=0.003 --workdir /tmp/flax
"""

import ml_collections


def get_config(arg=None):
    config = ml_collections.ConfigDict()
    config.seed = 0  # split, initialisation and shuffling
    config.test_size = 0.25
    config.models = ("mlp", "cnn")
    config.mlp_hidden = (256, 256)
    config.cnn_features = (16, 32)
    config.cnn_hidden = 128
    config.label_smoothing = 0.1
    config.optimizer = "adamw"  # an optax optimiser taking a learning rate
    config.learning_rate = 2e-3
    config.weight_decay = 1e-4  # only used by optimisers that take it (adamw, ...)
    config.epochs = 40
    config.batch_size = 64
    config.bar = 0.97  # test accuracy to reach on held-out digits
    config.log_every = 1  # epochs
    if arg == "smoke":
        config.epochs = 15
    elif arg is not None:
        raise ValueError(f"unknown config variant {arg!r}; use ':smoke' or nothing")
    return config
