"""Per-shape implementation choices recorded by the GPU kernel benchmarks
(`experiments/make_autotune.py` reads their JSON).

The table lives in `sdjax/assets/autotune.json`:
    {"device": "...", "jax": "...", "choices": {"attention": {"<key>": "flash", ...}, ...}}
A key is `shape_key(op, shape_a, shape_b, dtype)`. A shape that was never measured gets the
op's default, which `sdjax.ops` names per op. `auto` consults this table only on GPU.
"""

from __future__ import annotations

import functools
import json
import pathlib

import numpy as np

TABLE_PATH = pathlib.Path(__file__).parent / "assets" / "autotune.json"


def shape_key(op: str, shape_a, shape_b, dtype) -> str:
    """The table key of an op at a shape. The leading batch dimension of the activations is
    left out: a choice measured at one batch (the benchmarks use 2, one guided image) stands
    for every batch, so `auto` keeps its choices for batches of prompts and per-device shards.
    shape_b is the kv shape (attention, batch dropped too) or the weight shape (geglu)."""
    a = shape_a[1:]
    b = (
        "-"
        if shape_b is None
        else "x".join(map(str, shape_b[1:] if op == "attention" else shape_b))
    )
    return f"{op}:{'x'.join(map(str, a))}:{b}:{np.dtype(dtype).name}"


@functools.cache
def _table(path: str = str(TABLE_PATH)) -> dict:
    p = pathlib.Path(path)
    if not p.exists():
        return {}
    return json.loads(p.read_text()).get("choices", {})


# A dtype without measurements of its own borrows those of the same width: bfloat16 runs on the
# same tensor-core rate and moves the same bytes as float16, in our kernels and in cuDNN's.
_SAME_WIDTH = {"bfloat16": "float16"}


def choose(op: str, shape_a, shape_b, dtype, *, default: str) -> str:
    """The recorded fastest implementation of `op` at this shape, else `default`. A bfloat16
    shape that was never measured takes the float16 choice at the same shape."""
    choices = _table().get(op, {})
    key = shape_key(op, shape_a, shape_b, dtype)
    if key not in choices and np.dtype(dtype).name in _SAME_WIDTH:
        key = shape_key(op, shape_a, shape_b, _SAME_WIDTH[np.dtype(dtype).name])
    return choices.get(key, default)
