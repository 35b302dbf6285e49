"""AWQ (Lin et al., 2024): activation-aware weight scaling, searched on the calibration statistics.

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

Clipping (optional, after the scales are folded) shrinks each row's quantization group to
[r min, r max] (symmetric schemes: +-r max|w|) before quantization: a few outliers lose precision
and the rest of the group gets finer steps. Each group quantizes on its own, so r is chosen per
row and group on that group's share of the error, dw_g^T (X^T X)[g, g] dw_g, the diagonal block
of X^T X (the cross terms between groups are left out, as AutoAWQ's per-group search does).
"""

import dataclasses
import logging
from dataclasses import dataclass
from typing import Any, Callable, Literal

import torch
from compressed_tensors.quantization import QuantizationScheme, QuantizationStrategy
from pydantic import Field

from modelpress.engine.errors import ModelPressError
from modelpress.engine.mappings import Mapping, parse_awq_mappings
from modelpress.engine.modifier import LayerState, Plan, Planned
from modelpress.engine.quantize import QuantizedLinear, dequantize, minmax_qparams, quantize
from modelpress.engine.smoothing import SmoothingModifier, SmoothingPlan
from modelpress.engine.statistics import ActivationStats

log = logging.getLogger(__name__)

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


# Linears whose outputs meet in softmax(q k^T): their errors are multiplied together and pass
# through the softmax, which the layer's own output error does not see; AutoAWQ leaves them unclipped.
ATTENTION_SCORE_PROJECTIONS = ("q_proj", "k_proj", "qkv_proj")


def feeds_attention_scores(name: str) -> bool:
    return name.rsplit(".", 1)[-1] in ATTENTION_SCORE_PROJECTIONS


@dataclass
class ClipResult:
    weight: torch.Tensor  # float32, each group clamped to its chosen range
    ratios: torch.Tensor  # [rows, groups], the chosen r (1: not clipped)
    loss: torch.Tensor  # [rows, groups], group output error with the chosen r
    unclipped_loss: torch.Tensor  # [rows, groups], with r = 1


def search_clip(
    w: torch.Tensor,
    xtx: torch.Tensor,
    fake_quant: FakeQuant,
    group_size: int | None,
    symmetric: bool,
    n_grid: int,
    max_shrink: float,
    passes: int = 0,
) -> ClipResult:
    """Per row and quantization group, the shrink r of the group's range with least output error.

    r runs over 1, 1 - 1/n_grid, ... while the shrink stays below `max_shrink` (AutoAWQ's grid).
    r = 1 is a candidate, so no group's error grows. `group_size` None is one group per row
    (per-channel scales). With `passes`, the groups' choices are then revised that many times on
    each row's whole output error (`_coupled`); `loss` stays the per-group search's.
    """
    w = w.float()
    rows, cols = w.shape
    size = group_size or cols
    groups = cols // size
    g = w.reshape(rows, groups, size)
    at = torch.arange(groups, device=w.device)
    blocks = xtx.float().to(w.device).reshape(groups, size, groups, size)[at, :, at, :]  # [groups, size, size]
    hi = g.abs().amax(-1, keepdim=True) if symmetric else g.amax(-1, keepdim=True)
    lo = -hi if symmetric else g.amin(-1, keepdim=True)

    def clipped(r: torch.Tensor | float) -> torch.Tensor:
        return torch.clamp(g, lo * r, hi * r)

    def error(r: float) -> torch.Tensor:
        dw = g - fake_quant(clipped(r).reshape(rows, cols)).reshape(rows, groups, size)
        return torch.einsum("rgi,gij,rgj->rg", dw, blocks, dw)

    unclipped = error(1.0)
    best, chosen = unclipped, torch.zeros_like(unclipped, dtype=torch.long)  # chosen: [rows, groups], index into shrinks
    shrinks = [1 - i / n_grid for i in range(max(1, int(max_shrink * n_grid)))]  # 1 (unclipped) always first
    for k, r in enumerate(shrinks[1:], 1):
        loss = error(r)
        better = loss < best
        best = torch.where(better, loss, best)
        chosen = torch.where(better, k, chosen)
    if passes and groups > 1:
        chosen = _coupled(g, lo, hi, xtx.float().to(w.device), fake_quant, chosen, shrinks, passes)
    ratios = torch.tensor(shrinks, device=w.device)[chosen]
    return ClipResult(clipped(ratios[..., None]).reshape(rows, cols), ratios, best, unclipped)


def _coupled(
    g: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor, xtx: torch.Tensor, fake_quant: FakeQuant,
    chosen: torch.Tensor, shrinks: list[float], passes: int,
) -> torch.Tensor:
    """Each row's group shrinks (`chosen`, indices into `shrinks`) revised on the row's whole output
    error, cross terms included.

    The per-group search scores group j on dw_j X_j^T X_j dw_j^T alone. The row's error is
    e = dw X^T X dw^T, and moving group j's error by d changes it by 2 d (dw X^T X)_j + d (X^T X)_jj d^T,
    so one group at a time, every row takes the shrink that lowers e most given its other groups
    (none when none does): e never rises. `u` = dw X^T X is kept up to date as groups move.
    """
    rows, groups, size = g.shape
    chosen = chosen.clone()

    def errors(j: int) -> torch.Tensor:  # [shrinks, rows, size]: group j's error at every shrink
        # made again on every pass: keeping them all would hold len(shrinks) copies of the weight
        return torch.stack([g[:, j] - fake_quant(torch.clamp(g[:, j], lo[:, j] * r, hi[:, j] * r)) for r in shrinks])

    ratios = torch.tensor(shrinks, device=g.device)[chosen][..., None]
    dw = (g - fake_quant(torch.clamp(g, lo * ratios, hi * ratios).reshape(rows, -1)).reshape(g.shape)).reshape(rows, -1)
    u = dw @ xtx
    for _ in range(passes):
        for j in range(groups):
            cols = slice(j * size, (j + 1) * size)
            move = errors(j) - dw[None, :, cols]
            change = 2 * (move * u[None, :, cols]).sum(-1) + ((move @ xtx[cols, cols]) * move).sum(-1)  # [shrinks, rows]
            best = change.argmin(0)
            taken = change.gather(0, best[None])[0] < 0
            step = move[best, torch.arange(rows)] * taken[:, None]
            dw[:, cols] += step
            u += step @ xtx[cols]
            chosen[:, j] = torch.where(taken, best, chosen[:, j])
    return chosen


class AWQModifier(SmoothingModifier):
    """AWQ: per mapping, the grid-searched scales that minimize the balance Linears' output error
    once quantized with the scheme of the quantizing modifier that follows it in the recipe.

    With `apply_clip` (AutoAWQ's name), the scaled balance Linears are then clipped per row and
    group to the range with least output error, except q/k, which feed attention scores.
    """

    parse_mappings = staticmethod(parse_awq_mappings)
    mappings: list[Any] | None = None
    duo_scaling: bool | Literal["both"] = True
    n_grid: int = Field(20, ge=1)
    offload_device: str | None = None  # accepted for recipes: the search holds one group's X^T X, nothing to offload
    apply_clip: bool = False
    clip_n_grid: int = Field(20, ge=1)
    clip_max_shrink: float = Field(0.5, gt=0, lt=1)
    # ModelPress's own: passes revising each row's group clips on its whole output error (search_clip); 0: AutoAWQ's per-group choice
    clip_passes: int = Field(2, ge=0)

    def needs_hessians(self) -> bool:
        return True  # the search reads the inputs through X^T X

    def bind(self, plan: Plan, earlier: list[Planned], later: list[Planned]) -> Plan:
        """The plan with the quantizer that follows: its schemes are what the search quantizes with."""
        plan = super().bind(plan, earlier, later)
        quantizers = [other for modifier, other in later if modifier.quantizes]
        if not quantizers:
            raise ModelPressError(
                "recipe: AWQModifier scales weights for the quantizer after it; add a QuantizationModifier or GPTQModifier after it"
            )
        return dataclasses.replace(plan, quantizer=quantizers[0])

    def scales(self, plan: SmoothingPlan, mapping: Mapping, balance: dict[str, torch.nn.Linear], stats: ActivationStats) -> torch.Tensor:
        quantizer = _quantizer(plan)
        if stats.xtx is None:
            raise ModelPressError(f"AWQModifier: no X^T X for {mapping.balance[0]}; AWQ needs calibration data")
        schemes = [quantizer[n].scheme if n in quantizer else None for n in balance]
        fakes = [fake_quantizer(s) if s is not None and s.weights is not None else None for s in schemes]
        weighted = [s.weights for s in schemes if s is not None and s.weights is not None]
        group_size = weighted[0].group_size if weighted and weighted[0].strategy == QuantizationStrategy.GROUP else None
        weights = [m.weight.data for m in balance.values()]
        duos = [True, False] if self.duo_scaling == "both" else [bool(self.duo_scaling)]
        results = [search_scales(stats.gram, stats.tokens, weights, fakes, group_size, self.n_grid, d) for d in duos]
        return min(results, key=lambda r: r.loss).scales

    def apply(
        self, plan: Plan, modules: dict[str, torch.nn.Linear], stats: dict[str, ActivationStats], state: LayerState
    ) -> dict[str, QuantizedLinear]:
        done = super().apply(plan, modules, stats, state)
        if self.apply_clip:
            assert isinstance(plan, SmoothingPlan)
            for mapping in plan.mappings:
                if all(n in modules for n in mapping.balance):
                    self._clip(_quantizer(plan), {n: modules[n] for n in mapping.balance}, stats[mapping.balance[0]])
        return done

    def _clip(self, quantizer: Plan, balance: dict[str, torch.nn.Linear], stats: ActivationStats) -> None:
        """Clip the balance Linears the quantizer quantizes per row (channel or group scales); a
        per-tensor scale couples every row, so those are left as they are. `stats` already
        describes the scaled inputs (rescale_inputs)."""
        per_row = (QuantizationStrategy.GROUP, QuantizationStrategy.CHANNEL)
        args = {n: quantizer[n].scheme.weights for n in balance if n in quantizer and not feeds_attention_scores(n)}
        args = {n: a for n, a in args.items() if a is not None and a.strategy in per_row}
        if not args:
            return
        gram = stats.gram
        for name, a in args.items():
            w = balance[name].weight.data
            group_size = a.group_size if a.strategy == QuantizationStrategy.GROUP else None
            fake = fake_quantizer(quantizer[name].scheme)
            result = search_clip(w, gram, fake, group_size, a.symmetric, self.clip_n_grid, self.clip_max_shrink, self.clip_passes)
            balance[name].weight.data = result.weight.to(w.dtype)
            log.debug("AWQ clip %s: group output error %.4g -> %.4g", name, float(result.unclipped_loss.sum()), float(result.loss.sum()))


def _quantizer(plan: SmoothingPlan) -> Plan:
    """The follower's plan that `bind` put in; a plan that skipped binding cannot be searched."""
    if plan.quantizer is None:
        raise ModelPressError("AWQModifier: no quantizer follows it in the recipe")
    return plan.quantizer


def fake_quantizer(scheme: QuantizationScheme) -> FakeQuant:
    """Round-to-nearest with min-max scales: the quantization AWQ searches against."""
    args = scheme.weights

    def fake(w: torch.Tensor) -> torch.Tensor:
        qparams = minmax_qparams(w, args, torch.float32)
        return dequantize(quantize(w, qparams, args), qparams, args)

    return fake
