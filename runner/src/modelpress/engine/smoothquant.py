"""SmoothQuant (Xiao et al., 2023): per-channel scales that flatten activation outliers for W8A8.

s_j = max|X_j|^alpha / max|W_j|^(1 - alpha) moves part of each channel's range from the
activations, which are quantized per token, into the weights, which are quantized per channel.
The folding itself is shared with AWQ (smoothing.py).
"""

from typing import Any

import torch
from pydantic import Field

from modelpress.engine.mappings import Mapping, parse_smoothquant_mappings
from modelpress.engine.smoothing import SmoothingModifier, SmoothingPlan
from modelpress.engine.statistics import ActivationStats

MIN_SCALE = 1e-5  # floor for maxima and scales: a silent channel must not turn into inf


class SmoothQuantModifier(SmoothingModifier):
    """SmoothQuant: s_j = max|X_j|^alpha / max|W_j|^(1 - alpha) flattens activation outliers for W8A8."""

    parse_mappings = staticmethod(parse_smoothquant_mappings)
    smoothing_strength: float = Field(0.5, ge=0, le=1)
    mappings: list[Any] | None = None

    def keep(self, mappings: list[Mapping], modules: dict[str, torch.nn.Module]) -> list[Mapping]:
        """Derived mappings keep the norms only: folding v -> o and up -> down as well made the
        quantized model worse, not better (perplexities in bench/measurements.md)."""
        if self.mappings is not None:
            return mappings
        return [m for m in mappings if not isinstance(modules[m.smooth], torch.nn.Linear)]

    def scales(self, plan: SmoothingPlan, mapping: Mapping, balance: dict[str, torch.nn.Linear], stats: ActivationStats) -> torch.Tensor:
        return smoothquant_scales(stats.channel_absmax, [m.weight.data for m in balance.values()], self.smoothing_strength)


def smoothquant_scales(act_absmax: torch.Tensor, weights: list[torch.Tensor], alpha: float) -> torch.Tensor:
    """s_j = max|X_j|^alpha / max|W_:,j|^(1 - alpha), the weights of all balance layers together.

    alpha moves quantization difficulty from activations (alpha -> 1) to weights (alpha -> 0).
    A channel that never fires keeps s = 1.
    """
    w_absmax = torch.cat([w.float() for w in weights]).abs().amax(0).clamp(min=MIN_SCALE)
    x = act_absmax.float().to(w_absmax.device)
    s = x.clamp(min=MIN_SCALE).pow(alpha) / w_absmax.pow(1 - alpha)
    return torch.where(x > 0, s, torch.ones_like(s)).clamp(min=MIN_SCALE)
