"""A checkpoint's layout as plain JSON (keys, nesting, types; no values), to pin the file format that
every dalipipe release reads and writes: tests/data/checkpoint_layout.json was made by describe() from
checkpoints of the release that wrote format dalipipe-checkpoint-1 first (tests/data/make_checkpoint_layout.py).

torch's own state dicts (the model's, the optimizer's, the gradient scaler's) are torch's layout, not
dalipipe's: they are described as one opaque entry."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

LAYOUT_FILE = Path(__file__).resolve().parent / "data" / "checkpoint_layout.json"

# Where a checkpoint holds one of torch's state dicts: (path of keys) -> what it is.
TORCH_STATE = {("model",): "model state_dict", ("optimizer",): "optimizer state_dict",
               ("scaler",): "GradScaler state_dict", ("ema", "model"): "model state_dict"}


def describe(x: Any, path: tuple = ()) -> Any:
    if path in TORCH_STATE:
        return TORCH_STATE[path]
    if isinstance(x, torch.Tensor):
        return f"tensor {str(x.dtype).removeprefix('torch.')} {list(x.shape)}"
    if isinstance(x, dict):
        return {"dict": {str(k): describe(v, path + (k,)) for k, v in x.items()}}
    if isinstance(x, (list, tuple)):
        kind = type(x).__name__
        # Lists of one kind of item (history rows, ids, ranks): the first item stands for all.
        return {kind: [describe(x[0], path + (0,))] if len(x) else []}
    return type(x).__name__


def pinned() -> dict:
    return json.loads(LAYOUT_FILE.read_text())


def _tensor(desc: str) -> torch.Tensor:
    _, dtype, shape = desc.split(" ", 2)
    return torch.zeros(json.loads(shape), dtype=getattr(torch, dtype))


_SCALARS = {"int": lambda: 0, "float": lambda: 0.0, "str": lambda: "", "bool": lambda: False, "NoneType": lambda: None}


def build(layout: Any, given: dict[tuple, Any], path: tuple = ()) -> Any:
    """A checkpoint laid out exactly as `layout` describes: given[path] where given (torch's state dicts,
    or any value a test needs), else a placeholder of the described type."""
    if path in given:
        return given[path]
    if isinstance(layout, str):
        return _tensor(layout) if layout.startswith("tensor ") else _SCALARS[layout]()
    (kind, inner), = layout.items()
    if kind == "dict":
        return {k: build(v, given, path + (k,)) for k, v in inner.items()}
    items = [build(v, given, path + (0,)) for v in inner]
    return tuple(items) if kind == "tuple" else items
