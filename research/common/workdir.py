"""Workdir writers: config.json, metrics.jsonl (one line per logged step), metrics.json,
tables (markdown) and PNG figures."""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np


def to_jsonable(value: Any) -> Any:
    """Plain-JSON view of numbers, arrays and nested containers (NaN/inf become strings)."""
    if isinstance(value, Mapping):
        return {str(k): to_jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [to_jsonable(v) for v in value]
    if isinstance(value, np.ndarray | np.generic) or hasattr(value, "__array__"):
        array = np.asarray(value)
        return to_jsonable(array.item() if array.ndim == 0 else array.tolist())
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return value


class Workdir:
    """One script's output folder."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.mkdir(parents=True, exist_ok=True)
        self._metrics = self.path / "metrics.jsonl"
        self._metrics.write_text("")

    def write_config(self, config: Any) -> None:
        data = config.to_dict() if hasattr(config, "to_dict") else dict(config)
        self.write_json("config.json", data)

    def write_json(self, name: str, data: Any) -> Path:
        path = self.path / name
        path.write_text(json.dumps(to_jsonable(data), indent=2, sort_keys=False) + "\n")
        return path

    def log(self, **record: Any) -> None:
        """Append one line to metrics.jsonl (flushed at once, so it survives a crash)."""
        with self._metrics.open("a") as f:
            f.write(json.dumps(to_jsonable(record)) + "\n")

    def write_metrics(self, metrics: Mapping[str, Any]) -> Path:
        return self.write_json("metrics.json", metrics)

    def write_text(self, name: str, text: str) -> Path:
        path = self.path / name
        path.write_text(text)
        return path

    def save_figure(self, fig: plt.Figure, name: str) -> Path:
        path = self.path / name
        fig.savefig(path, dpi=110, bbox_inches="tight")
        plt.close(fig)
        return path


def _cell(value: Any, float_format: str) -> str:
    if isinstance(value, bool):
        return "yes" if value else "**NO**"
    if isinstance(value, float | np.floating):
        return format(float(value), float_format)
    return str(value).replace("|", "\\|")  # a literal pipe would end the cell


def markdown_table(
    rows: Sequence[Mapping[str, Any]],
    columns: Sequence[str] | None = None,
    float_format: str = ".6g",
    formats: Mapping[str, str] | None = None,
) -> str:
    """A GitHub markdown table of ``rows`` (dicts); floats formatted with ``float_format``
    or the per-column ``formats``."""
    if not rows:
        return "(no rows)\n"
    columns = list(columns or rows[0].keys())
    formats = formats or {}
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for row in rows:
        cells = [_cell(row.get(c, ""), formats.get(c, float_format)) for c in columns]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"
