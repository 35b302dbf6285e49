"""Deliberately damaged copies of a compressed checkpoint: the faults a checkpoint writer can make.

Each damage is a pure function of the checkpoint's tensors (name -> tensor) returning the damaged set;
`damaged_copy` writes the result beside the other files, index included, so what is wrong is only
what the damage changed. The vLLM tier serves these copies to prove its checks can fail.
"""

import json
import shutil
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

Tensors = dict[str, torch.Tensor]
INDEX = "model.safetensors.index.json"
PACK = 8  # int4 values per int32 of a pack-quantized tensor


def wrong_packed_shape(tensors: Tensors, module: str) -> Tensors:
    """`module`'s packed weight one int32 column short: 8 input features lost, its weight_shape unchanged."""
    key = f"{module}.weight_packed"
    return {**tensors, key: tensors[key][:, :-1].contiguous()}


def missing_scale(tensors: Tensors, module: str) -> Tensors:
    """`module`'s weight scale left out of the checkpoint."""
    return {name: t for name, t in tensors.items() if name != f"{module}.weight_scale"}


def swapped_heads(tensors: Tensors, module: str, head_dim: int, first: int, second: int) -> Tensors:
    """Heads `first` and `second` of a projection exchanged: their output rows, in the packed weight, its
    scales and its zero points (packed 8 rows to an int32) alike. Shapes and dtypes stay right."""
    rows = torch.arange(tensors[f"{module}.weight_packed"].shape[0])
    a, b = slice(first * head_dim, (first + 1) * head_dim), slice(second * head_dim, (second + 1) * head_dim)
    rows[a], rows[b] = rows[b].clone(), rows[a].clone()
    out = {**tensors}
    for part in ("weight_packed", "weight_scale"):
        out[f"{module}.{part}"] = tensors[f"{module}.{part}"][rows].contiguous()
    zero = f"{module}.weight_zero_point"
    if zero in tensors:
        assert head_dim % PACK == 0, "whole int32s of zero points move only when a head spans whole packs"
        out[zero] = tensors[zero][rows[::PACK] // PACK].contiguous()
    return out


def zero_point_dtype(tensors: Tensors, dtype: torch.dtype) -> Tensors:
    """Every packed zero point stored in `dtype` instead of int32 (the same numbers, as far as it holds them)."""
    return {name: t.to(dtype) if name.endswith(".weight_zero_point") else t for name, t in tensors.items()}


def damaged_copy(source: Path, target: Path, damage: Callable[[Tensors], Tensors]) -> Path:
    """`source` copied to `target` with its weights replaced by `damage` of them (one safetensors file)."""
    files = sorted(source.glob("*.safetensors"))
    assert len(files) == 1, f"{source}: expected one safetensors file, found {len(files)}"
    shutil.copytree(source, target, ignore=shutil.ignore_patterns("*.safetensors"))
    tensors = damage(load_file(files[0]))
    save_file(tensors, target / files[0].name, metadata={"format": "pt"})
    index = target / INDEX
    if index.is_file():
        document = json.loads(index.read_text(encoding="utf-8"))
        document["metadata"]["total_size"] = sum(t.nbytes for t in tensors.values())
        document["weight_map"] = {name: files[0].name for name in sorted(tensors)}
        index.write_text(json.dumps(document, indent=2) + "\n", encoding="utf-8")
    return target
