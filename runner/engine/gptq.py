"""GPTQ (Frantar et al., 2022): quantize a weight column by column, compensating each column's
rounding error on the columns not yet quantized, so the layer's output moves as little as possible.
"""

from dataclasses import dataclass
from typing import Callable

import torch
from compressed_tensors.quantization import QuantizationArgs, QuantizationStrategy, QuantizationType

from modelpress.runner.engine.quantize import QParams, minmax_qparams, qrange
from modelpress.runner.engine.second_order import activation_order, aligned_block_size, inverse_hessian, sweep

Observer = Callable[[torch.Tensor, QuantizationArgs, torch.dtype], QParams]


@dataclass
class GPTQResult:
    q: torch.Tensor  # codes in natural column order, as quantize() returns them
    qparams: QParams
    row_loss: torch.Tensor  # per output row: sum(e^2) / 2 of the sweep
    dampening_frac: float


def gptq(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    args: QuantizationArgs,
    block_size: int = 128,
    dampening_frac: float = 0.01,
    actorder: bool = True,
    observer: Observer = minmax_qparams,
    keep: torch.Tensor | None = None,
) -> GPTQResult:
    """Quantize `weight` [out, in] given the Hessian [in, in] of its layer-wise error.

    With `actorder`, columns are visited by descending Hessian diagonal (the static order: the
    result is stored in natural order, so it costs nothing at inference), and the scales are
    observed up front on the whole weight. Without it, a group's scale is observed when the
    sweep reaches the group, on the weights as the earlier columns' errors left them.
    `keep` (bool, [out, in]) forces the other weights to zero: a sparsity mask survives.
    """
    w = weight.float().clone()
    rows, cols = w.shape
    dtype = weight.dtype
    group = args.strategy == QuantizationStrategy.GROUP
    size = args.group_size if group else cols

    order = activation_order(hessian) if actorder else torch.arange(cols, device=w.device)
    h = hessian.float()[order][:, order]
    inverse = inverse_hessian(h, dampening_frac)
    w[:, inverse.dead[torch.argsort(order)]] = 0
    if keep is not None:
        w *= keep

    static = not group or actorder
    if static:
        qp = observer(w, args, dtype)
        scale, zero = _per_column(qp, args, rows, cols)
        scale, zero = scale[:, order], zero[:, order]
    else:
        scale = torch.empty(rows, cols, dtype=torch.float32, device=w.device)
        zero = torch.zeros(rows, cols, dtype=torch.float32, device=w.device)
        group_scales, group_zeros = [], []
    w = w[:, order]
    keep = keep[:, order] if keep is not None else None
    codes = torch.empty_like(w)
    qmin, qmax = qrange(args)
    is_float = args.type == QuantizationType.FLOAT

    def step(w1: torch.Tensor, _u1: torch.Tensor, i: int, col: int) -> torch.Tensor:
        if not static and col % size == 0:
            gqp = observer(w1[:, i : i + size], args, dtype)
            group_scales.append(gqp.scale)
            group_zeros.append(gqp.zero_point)
            scale[:, col : col + size] = gqp.scale.float()
            if gqp.zero_point is not None:
                zero[:, col : col + size] = gqp.zero_point.float()
        x = w1[:, i] if keep is None else w1[:, i] * keep[:, col]
        s, z = scale[:, col], zero[:, col]
        x = (x / s + z).clamp(qmin, qmax)
        code = x.to(torch.float8_e4m3fn).float() if is_float else x.round()
        codes[:, col] = code
        return (code - z) * s

    row_loss = sweep(w, inverse.upper, aligned_block_size(block_size, size if group else 1), step)
    codes = codes[:, torch.argsort(order)]
    codes = codes.to(torch.float8_e4m3fn if is_float else torch.int8)
    if not static:
        zp = torch.cat(group_zeros, dim=1) if group_zeros[0] is not None else None
        qp = QParams(torch.cat(group_scales, dim=1), zp)
    return GPTQResult(codes, qp, row_loss, inverse.dampening_frac)


def _per_column(qp: QParams, args: QuantizationArgs, rows: int, cols: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and zero point of every weight as [out, in] float matrices (natural column order)."""
    scale = qp.scale.float()
    zero = qp.zero_point.float() if qp.zero_point is not None else torch.zeros_like(scale)
    if args.strategy == QuantizationStrategy.GROUP:
        index = torch.arange(cols, device=scale.device) // args.group_size
        return scale[:, index], zero[:, index]
    return scale.reshape(-1, 1).expand(rows, cols), zero.reshape(-1, 1).expand(rows, cols)
