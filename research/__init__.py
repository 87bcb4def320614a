"""Research scripts for xent_jax: fits checked against scikit-learn, Flax training, figures.

Every script is ``python -m research.<name> --config configs/<name>.py[:smoke]
[--config.key=value ...] [--workdir DIR]`` and also exposes ``main(config, workdir)`` for
``research.run_all`` (what ``make run`` calls) and the tests.
"""
