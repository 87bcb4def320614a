"""Text, its split by file, the byte-level BPE tokenizer, batches with a resumable position,
and the baselines the model must beat (general-purpose compressors and a unigram model).

The default corpus is the Python standard library's own ``.py`` files (test suites and
``site-packages`` left out), ``pydoc_data/topics.py`` included: several MB of code and English
prose present wherever Python is. Any other text file or folder can be named instead; nothing is
downloaded. Files are split into train / validation / test with a fixed seed, and the split is
written to the workdir (``split.json``) and reused on resume.
"""

from __future__ import annotations

import bz2
import dataclasses
import hashlib
import json
import lzma
import math
import sysconfig
import zlib
from pathlib import Path
from typing import Any

import numpy as np

SPLITS = ("train", "validation", "test")
EOT = "<|endoftext|>"  # token id 0: starts every document, so every byte of text is predicted
IGNORE = -100  # label of padding positions (the fused loss's ignore_index)


@dataclasses.dataclass
class Corpus:
    """Documents of each split (text) and what they came from."""

    root: str
    files: dict[str, list[str]]
    texts: dict[str, list[str]]
    skipped: list[str]

    def nbytes(self, split: str) -> int:
        """Raw UTF-8 bytes of the split's documents (what bits per byte divide by)."""
        return sum(len(t.encode("utf-8")) for t in self.texts[split])

    def raw_bytes(self, split: str) -> bytes:
        return b"".join(t.encode("utf-8") for t in self.texts[split])


def _source_root(source: str) -> Path:
    if source == "stdlib":
        return Path(sysconfig.get_paths()["stdlib"])
    path = Path(source).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"config.data.source: {source!r} does not exist")
    return path


def _list_documents(cfg: Any) -> tuple[Path, list[str]]:
    """(root, sorted relative paths) of the corpus files; one file gives its own name."""
    root = _source_root(cfg.source)
    if root.is_file():
        return root.parent, [root.name]
    exclude = set(cfg.exclude)
    found = []
    for path in root.rglob("*"):
        rel = path.relative_to(root)
        if not path.is_file() or path.suffix not in tuple(cfg.extensions):
            continue
        if exclude & set(rel.parts[:-1]):
            continue
        if cfg.max_file_bytes and path.stat().st_size > cfg.max_file_bytes:
            continue
        found.append(rel.as_posix())
    if not found:
        raise FileNotFoundError(f"no {tuple(cfg.extensions)} files under {root}")
    return root, sorted(found)


def _chunks(text: str, size: int) -> list[str]:
    """A single file cut at line ends into pieces of about ``size`` characters."""
    pieces, start = [], 0
    while start < len(text):
        end = text.find("\n", start + size)
        end = len(text) if end < 0 else end + 1
        pieces.append(text[start:end])
        start = end
    return pieces


def load_corpus(cfg: Any, seed: int, split_path: Path) -> Corpus:
    """Read the corpus and split it by file (or, for one file, by chunk).

    The split is recorded in ``split_path`` on first use; later calls (a resumed run) read the
    recorded split and fail if a file of it has changed. With ``cfg.max_files`` only a random
    subset of the files is read.
    """
    root, names = _list_documents(cfg)
    recorded = json.loads(split_path.read_text()) if split_path.exists() else None
    if recorded is not None:
        wanted = sorted({n.split("#")[0] for files in recorded["files"].values() for n in files})
    elif cfg.max_files and len(names) > 1:
        order = np.random.default_rng(seed).permutation(len(names))
        wanted = sorted(names[i] for i in order[: cfg.max_files])
    else:
        wanted = names
    texts: dict[str, str] = {}
    skipped = []
    for name in wanted:
        try:
            texts[name] = (root / name).read_bytes().decode("utf-8")
        except UnicodeDecodeError:  # byte-level BPE needs text; other encodings are left out
            skipped.append(name)
        except FileNotFoundError:
            raise FileNotFoundError(f"{split_path}: {name} is gone from {root}") from None
    if len(names) == 1 and texts:
        ((name, text),) = texts.items()
        texts = {f"{name}#{i}": piece for i, piece in enumerate(_chunks(text, cfg.chunk_chars))}
    if recorded is not None:
        files = recorded["files"]
        if (
            any(n not in texts for f in files.values() for n in f)
            or _digest(texts, files) != recorded["sha256"]
        ):
            raise ValueError(f"{split_path}: the corpus changed since the split was recorded")
    else:
        keys = sorted(texts)
        chosen = [keys[i] for i in np.random.default_rng(seed).permutation(len(keys))]
        n_test = max(1, round(cfg.test_fraction * len(chosen)))
        n_val = max(1, round(cfg.val_fraction * len(chosen)))
        if len(chosen) < n_test + n_val + 1:
            raise ValueError(f"{len(chosen)} documents are too few for three splits")
        files = {
            "train": sorted(chosen[n_test + n_val :]),
            "validation": sorted(chosen[n_test : n_test + n_val]),
            "test": sorted(chosen[:n_test]),
        }
        tmp = split_path.with_suffix(".tmp")
        tmp.write_text(
            json.dumps(
                {
                    "root": str(root),
                    "seed": seed,
                    "sha256": _digest(texts, files),
                    "bytes": {s: sum(len(texts[n].encode()) for n in files[s]) for s in SPLITS},
                    "files": files,
                    "skipped_not_utf8": skipped,
                },
                indent=1,
            )
            + "\n"
        )
        tmp.replace(split_path)
    return Corpus(
        root=str(root),
        files=files,
        texts={s: [texts[n] for n in files[s]] for s in SPLITS},
        skipped=skipped,
    )


def _digest(texts: dict[str, str], files: dict[str, list[str]]) -> str:
    h = hashlib.sha256()
    for split in SPLITS:
        for name in files[split]:
            h.update(f"{split}/{name}\0".encode())
            h.update(texts[name].encode("utf-8"))
    return h.hexdigest()


# Tokenizer --------------------------------------------------------------------------------------


def train_or_load_tokenizer(texts: list[str], vocab_size: int, min_frequency: int, path: Path):
    """Byte-level BPE trained on ``texts`` and saved to ``path``; loaded from there if present."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    if path.exists():
        tokenizer = Tokenizer.from_file(str(path))
        if tokenizer.get_vocab_size() != vocab_size:
            raise ValueError(
                f"{path} has {tokenizer.get_vocab_size()} tokens, config.tokenizer.vocab_size "
                f"is {vocab_size}"
            )
        return tokenizer
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=[EOT],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer)
    if tokenizer.get_vocab_size() != vocab_size:
        raise ValueError(
            f"the training split yields only {tokenizer.get_vocab_size()} BPE tokens, "
            f"fewer than config.tokenizer.vocab_size={vocab_size}"
        )
    tmp = path.with_suffix(".tmp")
    tokenizer.save(str(tmp))
    tmp.replace(path)
    return tokenizer


def encode(tokenizer, texts: list[str]) -> np.ndarray:
    """One stream of token ids: ``EOT doc_0 EOT doc_1 ...`` (int32)."""
    eot = tokenizer.token_to_id(EOT)
    parts = []
    for enc in tokenizer.encode_batch(texts, add_special_tokens=False):
        parts.append(np.asarray([eot], np.int32))
        parts.append(np.asarray(enc.ids, np.int32))
    return np.concatenate(parts) if parts else np.zeros((0,), np.int32)


def round_trips(tokenizer, texts: list[str]) -> bool:
    """Whether decoding the tokens gives back every text exactly (byte-level BPE should)."""
    encoded = tokenizer.encode_batch(texts, add_special_tokens=False)
    decoded = tokenizer.decode_batch([e.ids for e in encoded], skip_special_tokens=False)
    return decoded == list(texts)


# Batches ----------------------------------------------------------------------------------------


def windows(stream: np.ndarray, seq_len: int) -> tuple[np.ndarray, np.ndarray]:
    """Cut a stream into ``[M, seq_len]`` inputs and next-token labels covering every token
    after the first; the last window's missing positions get input 0 and label IGNORE."""
    m = max(1, math.ceil((len(stream) - 1) / seq_len))
    inputs = np.zeros((m, seq_len), np.int32)
    labels = np.full((m, seq_len), IGNORE, np.int32)
    flat_in, flat_lab = inputs.reshape(-1), labels.reshape(-1)
    n = len(stream) - 1
    flat_in[:n] = stream[:-1]
    flat_lab[:n] = stream[1:]
    return inputs, labels


class Batches:
    """Shuffled training batches whose position is part of the checkpoint.

    Epoch ``e`` visits the windows in ``permutation(seed, e)`` order, ``batch_size`` at a time;
    an epoch's last, short batch is padded with IGNORE rows. ``state()`` (epoch and position)
    and ``restore(state)`` make a resumed run see exactly the batches it would have seen.
    """

    def __init__(self, stream: np.ndarray, seq_len: int, batch_size: int, seed: int):
        self.inputs, self.labels = windows(stream, seq_len)
        self.batch_size, self.seed = batch_size, seed
        self.epoch, self.position = 0, 0
        self._order = self._permutation(0)

    def _permutation(self, epoch: int) -> np.ndarray:
        return np.random.default_rng([self.seed, epoch]).permutation(len(self.inputs))

    @property
    def windows_per_epoch(self) -> int:
        return len(self.inputs)

    def state(self) -> dict[str, int]:
        return {"epoch": self.epoch, "position": self.position, "seed": self.seed}

    def restore(self, state: dict[str, int]) -> None:
        if state["seed"] != self.seed:
            raise ValueError(f"checkpointed data seed {state['seed']} != config seed {self.seed}")
        self.epoch, self.position = int(state["epoch"]), int(state["position"])
        self._order = self._permutation(self.epoch)

    def next(self) -> tuple[np.ndarray, np.ndarray]:
        """The next ``[batch_size, seq_len]`` inputs and labels."""
        rows = self._order[self.position : self.position + self.batch_size]
        self.position += self.batch_size
        if self.position >= len(self._order):
            self.epoch, self.position = self.epoch + 1, 0
            self._order = self._permutation(self.epoch)
        inputs, labels = self.inputs[rows], self.labels[rows]
        pad = self.batch_size - len(rows)
        if pad:
            inputs = np.concatenate([inputs, np.zeros((pad, inputs.shape[1]), np.int32)])
            labels = np.concatenate([labels, np.full((pad, labels.shape[1]), IGNORE, np.int32)])
        return inputs, labels


def eval_batches(stream: np.ndarray, seq_len: int, batch_size: int, max_batches: int = 0):
    """Every window of a stream in order (the last batch padded with IGNORE rows)."""
    inputs, labels = windows(stream, seq_len)
    count = math.ceil(len(inputs) / batch_size)
    if max_batches:
        count = min(count, max_batches)
    for i in range(count):
        rows = slice(i * batch_size, (i + 1) * batch_size)
        x, y = inputs[rows], labels[rows]
        pad = batch_size - len(x)
        if pad:
            x = np.concatenate([x, np.zeros((pad, seq_len), np.int32)])
            y = np.concatenate([y, np.full((pad, seq_len), IGNORE, np.int32)])
        yield x, y


# Baselines --------------------------------------------------------------------------------------


def compressor_bits_per_byte(data: bytes) -> dict[str, float]:
    """zlib -9, bz2 -9 and xz (lzma preset 9) on the same bytes, in bits per byte."""
    sizes = {
        "zlib": len(zlib.compress(data, 9)),
        "bz2": len(bz2.compress(data, 9)),
        "lzma": len(lzma.compress(data, preset=9)),
    }
    return {name: 8.0 * size / len(data) for name, size in sizes.items()}


def unigram_bits_per_byte(
    train: np.ndarray, test: np.ndarray, vocab_size: int, test_bytes: int, alpha: float = 1.0
) -> float:
    """A unigram model of the training tokens (add-``alpha`` smoothing) on the test tokens
    after the first (the ones the language model predicts), in bits per byte."""
    counts = np.bincount(train, minlength=vocab_size).astype(np.float64) + alpha
    log2p = np.log2(counts) - np.log2(counts.sum())
    return float(-log2p[test[1:]].sum() / test_bytes)
