"""AWQ: activation-aware weight scaling, searched on the calibration statistics.

Channels that carry large activations matter most to the output, so scaling their weight columns
up by s (and their activations down by s) before quantization gives them finer steps. The scale is
s = a^r / w^(1 - r) ("duo") or s = a^r, with a the per-channel activation magnitude, w the mean
group-normalized weight magnitude, and r chosen from a grid on [0, 1) to minimize the output
error of the balance Linears after quantization.

The output error of a Linear with weight error dW on inputs X is ||X dW^T||^2 = tr(dW X^T X dW^T),
so the search reads the inputs only through X^T X: every calibration token counts, and a grid
point costs rows x in^2 instead of tokens x rows x in. The activation magnitude a is the channel
RMS, sqrt(diag(X^T X) / n), from the same matrix (AWQ's mean |x| ranks channels alike; the grid
absorbs the difference in spread). No scaling (s = 1) is kept when no grid point beats it.
"""

from dataclasses import dataclass
from typing import Callable

import torch

FakeQuant = Callable[[torch.Tensor], torch.Tensor]  # weight -> its quantized-then-dequantized value

EPS = 1e-4  # AWQ's floor for weight magnitudes and scales


@dataclass
class AWQResult:
    scales: torch.Tensor  # fold 1/s into the smooth layer, s into the balance columns
    ratio: float | None  # the chosen r, None when no scaling won
    loss: float  # output error with the chosen scales
    unscaled_loss: float  # output error of plain quantization, for the report


def weight_magnitude(weights: list[torch.Tensor], group_size: int | None) -> torch.Tensor:
    """Per input channel: mean over rows of |w| relative to its quantization group's largest |w|."""
    w = torch.cat([x.float() for x in weights]).abs()
    rows, cols = w.shape
    size = group_size if group_size and cols % group_size == 0 else cols
    g = w.reshape(rows, cols // size, size)
    return (g / g.amax(-1, keepdim=True).clamp(min=1e-12)).reshape(rows, cols).mean(0)


def output_error(w: torch.Tensor, w_hat: torch.Tensor, xtx: torch.Tensor) -> float:
    """sum over tokens of ||x (w - w_hat)^T||^2 = tr(dW X^T X dW^T)."""
    dw = w - w_hat
    return float(((dw @ xtx) * dw).sum())


def search_scales(
    xtx: torch.Tensor,
    tokens: int,
    weights: list[torch.Tensor],
    fake_quants: list[FakeQuant | None],
    group_size: int | None,
    n_grid: int,
    duo_scaling: bool,
) -> AWQResult:
    """The per-channel scales with least output error over the balance layers (`weights`).

    A layer whose fake quantizer is None is not quantized: it is scaled with the others but adds
    no error.
    """
    xtx = xtx.float()
    ws = [w.float() for w in weights]
    act = (torch.diagonal(xtx) / max(tokens, 1)).clamp(min=0).sqrt()
    wmag = weight_magnitude(ws, group_size)

    def error(s: torch.Tensor) -> float:
        return sum(output_error(w, fq(w * s) / s, xtx) for w, fq in zip(ws, fake_quants) if fq is not None)

    ones = torch.ones_like(act)
    best = AWQResult(ones, None, error(ones), 0.0)
    best.unscaled_loss = best.loss
    for i in range(n_grid):
        r = i / n_grid
        s = act.pow(r) / (wmag.pow(1 - r) + EPS) if duo_scaling else act.pow(r)
        s = s.clamp(min=EPS)
        s = s / (s.max() * s.min()).sqrt()  # centre the scales around 1 (geometric mean of the extremes)
        loss = error(s)
        if loss < best.loss:
            best = AWQResult(s, r, loss, best.unscaled_loss)
    return best
