"""A decoder-only transformer language model trained with xent_jax's fused, sharded loss on the
Python standard library's source (byte-level BPE), with checkpoints, a resume check, bits per
byte against zlib / bz2 / xz and a unigram model, and a memory comparison with the
materialised loss.

Variants: the default (``make run``: a few minutes on a 2-core CPU), ``smoke`` (``make test``:
seconds) and ``gpu`` (one GPU: vocabulary 32768, a GPT-2-small-sized model).

    python -m research.language_model --config configs/language_model.py \
        --workdir runs/scripts/language_model
    python -m research.language_model --config configs/language_model.py:smoke \
        --workdir /tmp/lm_smoke
    python -m research.language_model --config configs/language_model.py:gpu \
        --workdir /tmp/lm_gpu
    # Run the same workdir again to resume from its last checkpoint (after a SIGTERM, a crash,
    # or train.stop_at_step); another text corpus:
    python -m research.language_model --config configs/language_model.py \
        --config.data.source=/path/to/folder --config.data.extensions=.txt,.md --workdir DIR

Sharding: ``mesh.data`` x ``mesh.model`` devices (``mesh.data=-1``: all the devices that
``mesh.model`` leaves); the embedding / output matrix are split over the vocabulary on the model
axis, the batch over the data axis. On 8 simulated CPU devices:

    XLA_FLAGS=--xla_force_host_platform_device_count=8 python -m research.language_model \
        --config configs/language_model.py:smoke --config.mesh.data=2 --config.mesh.model=4 \
        --workdir /tmp/lm_2x4

Two processes on one machine (CPU collectives over gloo), each with 4 simulated devices, one
2 x 4 mesh across both (run both commands, ``process_id`` 0 and 1):

    XLA_FLAGS=--xla_force_host_platform_device_count=4 python -m research.language_model \
        --config configs/language_model.py:smoke --config.mesh.data=2 --config.mesh.model=4 \
        --config.distributed.num_processes=2 --config.distributed.process_id=0 \
        --config.distributed.coordinator_address=127.0.0.1:12355 --workdir /tmp/lm_mp

On a multi-host TPU pod or a GPU cluster (SLURM, Open MPI) start the same command on every host
with ``--config.distributed.auto=true`` (``jax.distributed.initialize()`` finds the
coordinator itself), ``--config.mesh.data=-1`` and ``--config.mesh.model=<devices per host or
fewer>``, and a ``--workdir`` on storage all hosts share (Orbax writes one checkpoint together).
"""

import ml_collections


def get_config(arg=None):
    config = ml_collections.ConfigDict()
    config.seed = 0  # split, initialisation and batch order

    config.data = ml_collections.ConfigDict()
    config.data.source = "stdlib"  # or a text file / folder
    config.data.extensions = (".py",)  # files taken from a folder
    config.data.exclude = ("site-packages", "test", "tests", "idle_test", "__pycache__")
    config.data.val_fraction = 0.05  # of the files
    config.data.test_fraction = 0.05
    config.data.max_files = 0  # 0: all; else a random subset of that many files
    config.data.max_file_bytes = 0  # 0: any size; else skip larger files
    config.data.chunk_chars = 65536  # a single-file corpus is split into chunks of this size

    config.tokenizer = ml_collections.ConfigDict()
    # The fused loss's memory advantage grows with V: at 16384 the whole train step needs under
    # 1/4 of the materialised step's temporary memory with this model (at 8192, about 0.4).
    config.tokenizer.vocab_size = 16384
    config.tokenizer.min_frequency = 2

    config.model = ml_collections.ConfigDict()
    config.model.dim = 128
    config.model.layers = 4
    config.model.heads = 2
    config.model.mlp_hidden = 512
    config.model.seq_len = 128
    config.model.positions = "rope"  # or "learned"
    config.model.tie_embeddings = True
    config.model.remat = True  # recompute each block in the backward pass

    config.train = ml_collections.ConfigDict()
    config.train.loss = "fused"  # or "materialised" (x @ w, then the loss)
    config.train.batch_size = 16
    config.train.steps = 400
    config.train.stop_at_step = 0  # 0: run to train.steps; else checkpoint and stop there
    config.train.learning_rate = 4e-3
    config.train.warmup_steps = 30
    config.train.min_lr_ratio = 0.1
    config.train.weight_decay = 0.1
    config.train.b1 = 0.9
    config.train.b2 = 0.95
    config.train.grad_clip = 1.0
    config.train.z_loss = 1e-4
    config.train.block_size_tokens = 0  # fused loss blocks; 0: the library's default
    config.train.block_size_vocab = 0

    config.mesh = ml_collections.ConfigDict()
    config.mesh.data = 1  # -1: every device that mesh.model leaves
    config.mesh.model = 1  # splits the vocabulary, the heads and the MLP

    config.checkpoint = ml_collections.ConfigDict()
    config.checkpoint.every = 100  # steps
    config.checkpoint.max_to_keep = 3

    config.eval = ml_collections.ConfigDict()
    config.eval.every = 100  # steps; validation loss on the first val_batches batches
    config.eval.val_batches = 4
    config.eval.batch_size = 32
    config.log_every = 10  # steps between reads of the losses from the device

    config.report = ml_collections.ConfigDict()
    config.report.final = True  # final evaluation, baselines, resume check, samples, report
    config.report.step_costs = True  # memory_analysis and step time, fused vs materialised
    config.report.timing_steps = 3  # timed steps per loss after a warm-up step
    config.report.resume_check_steps = 5
    config.report.samples = 2  # prompts, each continued greedily and at the temperature
    config.report.prompt_tokens = 12
    config.report.sample_tokens = 48
    config.report.temperature = 0.8

    config.distributed = ml_collections.ConfigDict()
    config.distributed.auto = False  # jax.distributed.initialize() with no arguments
    config.distributed.num_processes = 1  # > 1: initialise with the three values below
    config.distributed.process_id = 0
    config.distributed.coordinator_address = ""  # host:port of process 0
    config.distributed.cpu_collectives = "gloo"  # CPU backend's cross-process collectives

    config.debug = ml_collections.ConfigDict()
    config.debug.fail_after_step = 0  # raise after this step (no checkpoint): crash test
    config.debug.nan_after_step = 0  # NaN objective after this step: non-finite guard test

    config.bars = ml_collections.ConfigDict()
    config.bars.compressors = True  # test bits per byte below zlib -9's and the unigram's
    config.bars.seconds = 300.0  # whole script on a 2-core CPU; 0: no bar
    config.bars.memory_ratio = 0.25  # fused / materialised step temporary memory; 0: no bar

    if arg == "smoke":
        config.data.max_files = 40
        config.data.max_file_bytes = 24000
        config.data.val_fraction = 0.1
        config.data.test_fraction = 0.1
        config.tokenizer.vocab_size = 2048
        config.model.dim = 64
        config.model.heads = 4  # divisible by the model axis of the 2 x 4 mesh tests
        config.model.layers = 2
        config.model.mlp_hidden = 256
        config.model.seq_len = 64
        config.train.batch_size = 8
        config.train.steps = 40
        config.train.warmup_steps = 10
        config.checkpoint.every = 10
        config.eval.every = 20
        config.eval.val_batches = 2
        config.eval.batch_size = 16
        config.log_every = 5
        config.report.sample_tokens = 16
        config.report.timing_steps = 1
        # Too little training to beat a compressor, too small a vocabulary for the memory bar;
        # its time is that of make test's share of the machine: it must learn and resume.
        config.bars.compressors = False
        config.bars.seconds = 0.0
        config.bars.memory_ratio = 0.0
    elif arg == "gpu":
        # One GPU: GPT-2-small-sized, V=32768, 1024-token context (sized for an 80 GB card; not
        # run by the tests, which have no GPU).
        config.tokenizer.vocab_size = 32768
        config.model.dim = 768
        config.model.layers = 12
        config.model.heads = 12
        config.model.mlp_hidden = 3072
        config.model.seq_len = 1024
        config.train.batch_size = 32
        config.train.steps = 5000
        config.train.learning_rate = 6e-4
        config.train.warmup_steps = 200
        config.checkpoint.every = 500
        config.eval.every = 250
        config.eval.val_batches = 16
        config.eval.batch_size = 32
        config.log_every = 50
        config.report.sample_tokens = 128
        config.bars.seconds = 0.0
    elif arg is not None:
        raise ValueError(f"unknown config variant {arg!r}; use ':smoke', ':gpu' or nothing")
    return config
