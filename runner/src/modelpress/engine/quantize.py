"""Round-to-nearest quantization math: ranges, scales, zero points, quantize and dequantize.

Conventions follow compressed-tensors so that its readers reproduce our weights bit for bit:
the observed range is widened to include 0, symmetric scales are absmax / ((qmax - qmin) / 2),
a zero scale becomes the dtype's epsilon, and dequantization is (q - zp) * scale in the scale's
dtype. Scales have shape [out, in/G] (group), [out, 1] (channel) or [1] (tensor).
"""

from dataclasses import dataclass

import torch
from compressed_tensors.quantization import (
    QuantizationArgs,
    QuantizationScheme,
    QuantizationStrategy,
    QuantizationType,
)

FP8_MAX = 448.0  # largest finite float8_e4m3fn


@dataclass
class QParams:
    scale: torch.Tensor
    zero_point: torch.Tensor | None  # int8, same shape as scale; None when symmetric


def qrange(args: QuantizationArgs) -> tuple[float, float]:
    if args.type == QuantizationType.FLOAT:
        return -FP8_MAX, FP8_MAX
    return float(-(1 << (args.num_bits - 1))), float((1 << (args.num_bits - 1)) - 1)


def grouped(w: torch.Tensor, args: QuantizationArgs) -> torch.Tensor:
    """View a weight as [rows, groups, group_size] so that every strategy is one reduction."""
    if args.strategy == QuantizationStrategy.GROUP:
        return w.reshape(w.shape[0], -1, args.group_size)
    if args.strategy == QuantizationStrategy.CHANNEL:
        return w.reshape(w.shape[0], 1, -1)
    return w.reshape(1, 1, -1)


def qparams_from_range(
    xmin: torch.Tensor, xmax: torch.Tensor, args: QuantizationArgs, dtype: torch.dtype
) -> QParams:
    """Scale (and zero point) covering [xmin, xmax] widened to include 0."""
    qmin, qmax = qrange(args)
    xmin = xmin.float().clamp(max=0)
    xmax = xmax.float().clamp(min=0)
    if args.symmetric:
        scale = torch.maximum(-xmin, xmax) / ((qmax - qmin) / 2)
    else:
        scale = (xmax - xmin) / (qmax - qmin)
    scale = scale.to(dtype)
    scale = torch.where(scale == 0, torch.finfo(dtype).eps, scale)
    zero_point = None
    if not args.symmetric:
        zero_point = torch.round(qmin - xmin / scale.float()).clamp(qmin, qmax).to(torch.int8)
    return QParams(scale, zero_point)


def minmax_qparams(w: torch.Tensor, args: QuantizationArgs, dtype: torch.dtype) -> QParams:
    g = grouped(w, args)
    return _shaped(qparams_from_range(g.amin(-1), g.amax(-1), args, dtype), args)


def mse_qparams(
    w: torch.Tensor,
    args: QuantizationArgs,
    dtype: torch.dtype,
    grid: int = 100,
    max_shrink: float = 0.2,
    norm: float = 2.4,
) -> QParams:
    """Shrink each group's range by up to `max_shrink` and keep the one with least |error|^norm.

    Clipping a few outliers buys finer steps for the rest of the group; the search is the
    mean-squared-error observer of llm-compressor (same grid, shrink and norm).
    """
    g = grouped(w, args).float()
    xmin, xmax = g.amin(-1), g.amax(-1)
    best_err = torch.full(xmin.shape, float("inf"), device=w.device)
    best = qparams_from_range(xmin, xmax, args, dtype)
    for i in range(int(max_shrink * grid)):
        p = 1 - i / grid
        candidate = qparams_from_range(xmin * p, xmax * p, args, dtype)
        err = (_fake_grouped(g, candidate, args) - g).abs_().pow_(norm).sum(-1)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best.scale = torch.where(better, candidate.scale, best.scale)
        if best.zero_point is not None:
            best.zero_point = torch.where(better, candidate.zero_point, best.zero_point)
    return _shaped(best, args)


def quantize(w: torch.Tensor, qp: QParams, args: QuantizationArgs) -> torch.Tensor:
    """Integer codes as int8, or FP8 values as float8_e4m3fn, with the weight's shape.

    One float32 temporary of the weight's size, worked on in place: the widest Linear of a large
    model is hundreds of MiB in float32.
    """
    g = torch.div(grouped(w, args), _expand(qp.scale, args).float())  # promoted to float32
    if qp.zero_point is not None:
        g.add_(_expand(qp.zero_point, args).float())
    qmin, qmax = qrange(args)
    if args.type == QuantizationType.FLOAT:
        return g.clamp_(qmin, qmax).to(torch.float8_e4m3fn).reshape(w.shape)
    return g.round_().clamp_(qmin, qmax).to(torch.int8).reshape(w.shape)


def dequantize(q: torch.Tensor, qp: QParams, args: QuantizationArgs) -> torch.Tensor:
    """(q - zp) * scale in the scale's dtype: exactly what compressed-tensors' readers compute."""
    dtype = qp.scale.dtype
    g = grouped(q, args).to(dtype, copy=True)
    if qp.zero_point is not None:
        g.sub_(_expand(qp.zero_point, args).to(dtype))
    return g.mul_(_expand(qp.scale, args)).reshape(q.shape)


def _expand(t: torch.Tensor, args: QuantizationArgs) -> torch.Tensor:
    """Stored [out, groups] / [out, 1] / [1] parameters as [rows, groups, 1] for broadcasting."""
    if args.strategy == QuantizationStrategy.TENSOR:
        return t.reshape(1, 1, 1)
    return t.unsqueeze(-1)


def _shaped(qp: QParams, args: QuantizationArgs) -> QParams:
    """Observers reduce to [rows, groups]; per-tensor parameters are stored with shape [1]."""
    if args.strategy != QuantizationStrategy.TENSOR:
        return qp
    zp = qp.zero_point.reshape(1) if qp.zero_point is not None else None
    return QParams(qp.scale.reshape(1), zp)


def _fake_grouped(g: torch.Tensor, qp: QParams, args: QuantizationArgs) -> torch.Tensor:
    scale = qp.scale.float().unsqueeze(-1)
    x = g / scale
    if qp.zero_point is not None:
        x = x + qp.zero_point.float().unsqueeze(-1)
    qmin, qmax = qrange(args)
    x = x.clamp(qmin, qmax)
    x = x.to(torch.float8_e4m3fn).float() if args.type == QuantizationType.FLOAT else x.round()
    if qp.zero_point is not None:
        x = x - qp.zero_point.float().unsqueeze(-1)
    return x * scale


@dataclass
class QuantizedLinear:
    """What the checkpoint needs of one quantized Linear: codes, their parameters, and the scheme."""

    scheme: QuantizationScheme
    q: torch.Tensor
    qparams: QParams
    input_qparams: QParams | None = None  # static activation scale, observed on calibration data
