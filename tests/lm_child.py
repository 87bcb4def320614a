"""Child processes of ``tests/test_research_language_model.py`` (JAX fixes its device count and
its distributed runtime at start-up, so these runs need processes of their own).

    XLA_FLAGS=--xla_force_host_platform_device_count=8 python -m tests.lm_child sharded DIR STEPS
    XLA_FLAGS=--xla_force_host_platform_device_count=4 python -m tests.lm_child \
        process DIR STEPS PROCESS_ID PORT

``sharded``: the smoke config on a 2 data x 4 model mesh for STEPS steps. ``process``: one
of two processes joined by ``jax.distributed.initialize`` (CPU collectives over gloo) training
the smoke config on one 2 x 4 mesh across both. Each prints one JSON line: the per-step losses
and the device counts.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def smoke(steps: int, data: int, model: int):
    from research.common.config import get_config

    config = get_config("language_model", "smoke")
    config.train.stop_at_step = steps
    config.mesh.data, config.mesh.model = data, model
    return config


def main(argv: list[str]) -> None:
    mode, workdir, steps = argv[0], Path(argv[1]), int(argv[2])
    from research.language_model import run

    if mode == "sharded":
        result = run(smoke(steps, 2, 4), workdir)
        keys = ("losses", "devices", "mesh")
        print(json.dumps({k: result[k] for k in keys}))
    elif mode == "process":
        process_id, port = int(argv[3]), int(argv[4])
        config = smoke(steps, 2, 4)
        config.distributed.num_processes = 2
        config.distributed.process_id = process_id
        config.distributed.coordinator_address = f"127.0.0.1:{port}"
        result = run(config, workdir)
        import jax

        print(
            json.dumps(
                {
                    "losses": result["losses"],
                    "devices": result["devices"],
                    "local_devices": jax.local_device_count(),
                    "processes": jax.process_count(),
                    "process_index": jax.process_index(),
                }
            )
        )
    else:
        raise SystemExit(f"unknown mode {mode!r}")


if __name__ == "__main__":
    main(sys.argv[1:])
