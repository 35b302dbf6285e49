"""GPTQ (Frantar et al., 2022): quantize a weight column by column, compensating each column's
rounding error on the columns not yet quantized, so the layer's output moves as little as possible.
"""

from dataclasses import dataclass
from typing import Callable

import torch
from compressed_tensors.quantization import QuantizationArgs, QuantizationStrategy, QuantizationType

from modelpress.engine.quantize import QParams, minmax_qparams, qrange
from modelpress.engine.second_order import activation_order, aligned_block_size, inverse_hessian, sweep

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
    inverse = inverse_hessian(hessian.float()[order][:, order], dampening_frac)
    w[:, inverse.dead[torch.argsort(order)]] = 0
    if keep is not None:
        w *= keep

    static = not group or actorder
    if static:
        qp = observer(w, args, dtype)
        scale, zero = _per_column(qp, args, rows, cols)
        scale_t, zero_t = scale[:, order].T.contiguous(), zero[:, order].T.contiguous()
    else:
        scale_t = torch.empty(cols, rows, dtype=torch.float32, device=w.device)
        zero_t = torch.zeros(cols, rows, dtype=torch.float32, device=w.device)
        group_scales, group_zeros = [], []
    # W^T in sweep order: a column of W is a contiguous row (see sweep)
    wt = w[:, order].T.contiguous()
    keep_t = keep[:, order].T.contiguous() if keep is not None else None
    to_codes = _coder(args)

    def step(block: torch.Tensor, i: int, col: int) -> torch.Tensor:
        if not static and col % size == 0:
            gqp = observer(block[i : i + size].T, args, dtype)
            group_scales.append(gqp.scale)
            group_zeros.append(gqp.zero_point)
            scale_t[col : col + size] = gqp.scale.float().reshape(1, rows)
            if gqp.zero_point is not None:
                zero_t[col : col + size] = gqp.zero_point.float().reshape(1, rows)
        x = block[i] if keep_t is None else block[i] * keep_t[col]
        s, z = scale_t[col], zero_t[col]
        return to_codes(x, s, z).sub_(z).mul_(s)

    row_loss = sweep(wt, inverse.upper, aligned_block_size(block_size, size if group else 1), step)
    # the swept weights are the dequantized codes up to rounding far below a code step
    codes = to_codes(wt, scale_t, zero_t)[torch.argsort(order)].T.contiguous()
    codes = codes.to(torch.float8_e4m3fn if args.type == QuantizationType.FLOAT else torch.int8)
    if not static:
        zp = torch.cat(group_zeros, dim=1) if group_zeros[0] is not None else None
        qp = QParams(torch.cat(group_scales, dim=1), zp)
    return GPTQResult(codes, qp, row_loss, inverse.dampening_frac)


def _coder(args: QuantizationArgs) -> Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]:
    """x, scale, zero -> the codes of x as floats: clamp(x / scale + zero) on the format's grid."""
    qmin, qmax = qrange(args)
    if args.type == QuantizationType.FLOAT:
        return lambda x, s, z: torch.addcdiv(z, x, s).clamp_(qmin, qmax).to(torch.float8_e4m3fn).float()
    return lambda x, s, z: torch.addcdiv(z, x, s).clamp_(qmin, qmax).round_()


def _per_column(qp: QParams, args: QuantizationArgs, rows: int, cols: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and zero point of every weight as [out, in] float matrices (natural column order)."""
    scale = qp.scale.float()
    zero = qp.zero_point.float() if qp.zero_point is not None else torch.zeros_like(scale)
    if args.strategy == QuantizationStrategy.GROUP:
        index = torch.arange(cols, device=scale.device) // args.group_size
        return scale[:, index], zero[:, index]
    return scale.reshape(-1, 1).expand(rows, cols), zero.reshape(-1, 1).expand(rows, cols)
