"""Reading a compressed-tensors checkpoint back one tensor at a time, each quantized weight dequantized.

Everything needed to dequantize a Linear is in its own tensors, by the format's rules: int4/int2
weights are `weight_packed` (int32 words along the input dimension) with `weight_shape`; int8 and
FP8 weights are stored as they are; `weight_scale` has one column per group (one in all for
per-channel, a single value per-tensor), and an asymmetric scheme adds `weight_zero_point`
(packed along the output dimension when the weight is packed). So a reader needs no config groups.
"""

from pathlib import Path
from typing import Callable

import torch
from compressed_tensors.compressors.pack_quantized.helpers import unpack_from_int32

from modelpress.engine.weights import SafetensorsSource

QUANTIZED_SUFFIXES = ("weight_packed", "weight_shape", "weight_scale", "weight_zero_point", "input_scale", "input_zero_point")


def _packed_bits(packed_columns: int, columns: int) -> int:
    for bits in (4, 8, 2):
        if -(-columns // (32 // bits)) == packed_columns:
            return bits
    raise ValueError(f"a packed weight of {packed_columns} words cannot hold {columns} columns")


def _by_group(q: torch.Tensor, t: torch.Tensor, op: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]) -> None:
    """`op` (an in-place Tensor method) of the float weight `q` [rows, columns] with a scale or
    zero point that has one column per group, broadcast over each group's columns: no spread
    copy of the weight's size."""
    rows, columns = q.shape
    if t.dim() < 2 or t.shape[-1] == 1:
        op(q, t.reshape(-1, 1) if t.numel() > 1 else t.reshape(1, 1))
    elif columns % t.shape[-1] == 0:
        op(q.view(rows, t.shape[-1], -1), t.unsqueeze(-1))
    else:  # a last group cut short
        group = -(-columns // t.shape[-1])
        op(q, t.repeat_interleave(group, dim=1)[:, :columns])


def dequantized(get: Callable[[str], torch.Tensor], names: set[str], module: str, dtype: torch.dtype) -> torch.Tensor:
    """The float weight of the quantized Linear `module`: (q - zero_point) * scale."""
    scale = get(f"{module}.weight_scale").float()
    if f"{module}.weight_packed" in names:
        rows, columns = get(f"{module}.weight_shape").tolist()
        packed = get(f"{module}.weight_packed")
        bits = _packed_bits(packed.shape[1], columns)
        q = unpack_from_int32(packed, bits, torch.Size([rows, columns])).float()
        zero = None
        if f"{module}.weight_zero_point" in names:
            groups = scale.shape[1] if scale.dim() == 2 else 1
            zero = unpack_from_int32(get(f"{module}.weight_zero_point"), bits, torch.Size([rows, groups]), packed_dim=0)
    else:
        q = get(f"{module}.weight").float()
        zero = get(f"{module}.weight_zero_point") if f"{module}.weight_zero_point" in names else None
    if zero is not None:
        _by_group(q, zero.float(), torch.Tensor.sub_)
    _by_group(q, scale, torch.Tensor.mul_)
    return q.to(dtype)


class DequantizingSource(SafetensorsSource):
    """A checkpoint's tensors under their float names: a quantized Linear's `weight` is dequantized on read."""

    def __init__(self, model_dir: Path, rename: Callable[[str], str] = str, dtype: torch.dtype = torch.float32) -> None:
        super().__init__(model_dir, rename)
        self.dtype = dtype
        stored = set(self.entries)
        self.quantized = {n.rsplit(".", 1)[0] for n in stored if n.endswith(".weight_scale")}
        self.float_names = {n for n in stored if n.rsplit(".", 1)[-1] not in QUANTIZED_SUFFIXES} | {f"{m}.weight" for m in self.quantized}

    def names(self) -> set[str]:
        return self.float_names

    def get(self, name: str) -> torch.Tensor:
        module = name.removesuffix(".weight")
        if name.endswith(".weight") and module in self.quantized:
            return dequantized(super().get, set(self.entries), module, self.dtype)
        return super().get(name)
