"""Folding per-channel scales between a smooth layer and its balance Linears (SmoothQuant, AWQ).

With y = W x and x = smooth(...), dividing channel j of the smooth layer's output by s_j and
multiplying column j of every balance weight by s_j gives the same y: the float model is unchanged,
but the activations that will be quantized have flatter channels and the weights absorb the
difference. Every fold is computed in float32 and cast back to the parameter's dtype.
"""

import torch
from compressed_tensors.quantization import QuantizationStrategy

from modelpress.engine.calibration import ActivationStats
from modelpress.engine.quantize import QParams, QuantizedLinear, dequantize
from modelpress.engine.layer_pass import GroupInput

MIN_SCALE = 1e-5  # floor for maxima and scales: a silent channel must not turn into inf


def smoothquant_scales(act_absmax: torch.Tensor, weights: list[torch.Tensor], alpha: float) -> torch.Tensor:
    """s_j = max|X_j|^alpha / max|W_:,j|^(1 - alpha), the weights of all balance layers together.

    alpha moves quantization difficulty from activations (alpha -> 1) to weights (alpha -> 0).
    A channel that never fires keeps s = 1.
    """
    w_absmax = torch.cat([w.float() for w in weights]).abs().amax(0).clamp(min=MIN_SCALE)
    x = act_absmax.float().to(w_absmax.device)
    s = x.clamp(min=MIN_SCALE).pow(alpha) / w_absmax.pow(1 - alpha)
    return torch.where(x > 0, s, torch.ones_like(s)).clamp(min=MIN_SCALE)


def has_unit_offset(norm: torch.nn.Module) -> bool:
    """Whether the norm multiplies by (1 + w) rather than w (Gemma), found by running it.

    With its weight (and bias) zeroed, a plain norm outputs zeros and an offset norm does not.
    """
    weight, bias = norm.weight, getattr(norm, "bias", None)
    saved_w = weight.data.clone()
    saved_b = bias.data.clone() if isinstance(bias, torch.Tensor) else None
    try:
        weight.data.zero_()
        if saved_b is not None:
            bias.data.zero_()
        probe = torch.randn(1, weight.numel(), dtype=weight.dtype, device=weight.device)
        with torch.no_grad():
            return bool(norm(probe).abs().amax() > 0)
    finally:
        weight.data.copy_(saved_w)
        if saved_b is not None:
            bias.data.copy_(saved_b)


def fold_into_norm(norm: torch.nn.Module, s: torch.Tensor) -> None:
    """Divide the norm's output channels by s; an offset norm's (1 + w) becomes (1 + w) / s."""
    w = norm.weight.data
    if has_unit_offset(norm):
        norm.weight.data = ((1 + w.float()) / s - 1).to(w.dtype)
    else:
        norm.weight.data = (w.float() / s).to(w.dtype)
    bias = getattr(norm, "bias", None)
    if isinstance(bias, torch.Tensor):
        bias.data = (bias.data.float() / s).to(bias.dtype)


def fold_into_rows(linear: torch.nn.Linear, s: torch.Tensor, rows: tuple[int, int] | None) -> None:
    """Divide the Linear's output channels (its rows, or a slice of them) by s."""
    lo, hi = rows or (0, linear.out_features)
    w = linear.weight.data
    w[lo:hi] = (w[lo:hi].float() / s[:, None]).to(w.dtype)
    if linear.bias is not None:
        b = linear.bias.data
        b[lo:hi] = (b[lo:hi].float() / s).to(b.dtype)


def fold_into_quantized_rows(
    linear: torch.nn.Linear, done: QuantizedLinear, s: torch.Tensor, rows: tuple[int, int] | None
) -> bool:
    """Divide the rows of an already quantized Linear by s through its scales, keeping its codes.

    Exact for per-channel and per-group scales (one scale per row and group). A per-tensor scale
    cannot absorb a per-row factor: returns False and changes nothing.
    """
    args = done.scheme.weights
    if args.strategy not in (QuantizationStrategy.CHANNEL, QuantizationStrategy.GROUP):
        return False
    lo, hi = rows or (0, linear.out_features)
    scale = done.qparams.scale.clone()
    scale[lo:hi] = (scale[lo:hi].float() / s[:, None]).to(scale.dtype)
    done.qparams = QParams(scale, done.qparams.zero_point)
    linear.weight.data = dequantize(done.q, done.qparams, args).to(linear.weight.dtype)
    if linear.bias is not None:
        b = linear.bias.data
        b[lo:hi] = (b[lo:hi].float() / s).to(b.dtype)
    return True


def fold_into_columns(module: torch.nn.Module, s: torch.Tensor) -> None:
    """Multiply the input columns of the module's weight matrix (a Linear's, a MoE router's) by s."""
    w = module.weight.data
    module.weight.data = (w.float() * s[None, :]).to(w.dtype)


def rescale_inputs(stats: ActivationStats, s: torch.Tensor, xs: GroupInput | None) -> None:
    """Make collected inputs and their statistics those of the smoothed model: X -> X / s.

    X^T X becomes S^-1 X^T X S^-1 and channel maxima divide by s; the inputs at hand are divided
    in place. The range comes from those inputs; without them it is bounded by the largest
    channel maximum, which is exact for symmetric activation scales.
    """
    if stats.channel_absmax is not None:
        stats.channel_absmax = stats.channel_absmax / s.to(stats.channel_absmax.device)
    if stats.xtx is not None:
        inv = (1 / s).to(stats.xtx.device, stats.xtx.dtype)
        stats.xtx.mul_(inv[:, None]).mul_(inv[None, :])
    if xs is not None:
        lo, hi = None, None
        for x in xs.chunks():
            x.div_(s.to(x.device, x.dtype))
            lo = x.min() if lo is None else torch.minimum(lo, x.min())
            hi = x.max() if hi is None else torch.maximum(hi, x.max())
        stats.xmin, stats.xmax = lo.float(), hi.float()
    elif stats.channel_absmax is not None:
        bound = stats.channel_absmax.amax()
        stats.xmin, stats.xmax = -bound, bound
