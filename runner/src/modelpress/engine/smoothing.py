"""What SmoothQuant and AWQ share: per-channel scales moved from activations into weights.

With y = W x and x = smooth(...), dividing channel j of the smooth layer's output by s_j and
multiplying column j of every balance weight by s_j gives the same y: the float model is unchanged,
but the activations that will be quantized have flatter channels and the weights absorb the
difference. Every fold is computed in float32 and cast back to the parameter's dtype.

`SmoothingModifier` plans the mappings (mappings.py) and, per group of Linears that read one
input, asks its subclass for the scales (smoothquant.py, awq.py), folds them in, and rescales the
collected inputs and statistics, so that the quantizer after it sees the smoothed model without
another calibration pass.
"""

import logging
from dataclasses import dataclass, field
from types import MappingProxyType
from collections.abc import Callable
from typing import Any, ClassVar

import torch
from compressed_tensors.quantization import QuantizationScheme, QuantizationStrategy
from pydantic import field_validator

from modelpress.engine.errors import ModelPressError
from modelpress.engine.activations import Rows
from modelpress.engine.mappings import Mapping, MappingSpec, resolve_mappings
from modelpress.engine.modifier import LayerState, Modifier, Plan, Planned, frozen
from modelpress.engine.quantize import QParams, QuantizedLinear, dequantize
from modelpress.engine.statistics import ActivationStats
from modelpress.engine.targets import TargetedModule, is_matched
from modelpress.engine.weights import find_decoder_layers, untie_from_embeddings

log = logging.getLogger(__name__)


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


def rescale_inputs(stats: ActivationStats, s: torch.Tensor, xs: Rows | None) -> None:
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
        lows, highs = [], []

        def divide(x: torch.Tensor) -> None:
            x.div_(s.to(x.device, x.dtype))
            lows.append(x.min())
            highs.append(x.max())

        xs.update(divide)
        stats.xmin, stats.xmax = torch.stack(lows).min().float(), torch.stack(highs).max().float()
    elif stats.channel_absmax is not None:
        bound = stats.channel_absmax.amax()
        stats.xmin, stats.xmax = -bound, bound


@dataclass(frozen=True, eq=False)
class SmoothingPlan(Plan):
    """A smoothing modifier's plan: its balance Linears (`targeted`), the mappings that scale
    them, and every module a fold touches by name. For AWQ, `quantizer` is the plan of the
    quantizing modifier after it, whose schemes the search quantizes with (set by `bind`)."""

    mappings: tuple[Mapping, ...] = ()
    layers: MappingProxyType[str, torch.nn.Module] = field(default_factory=lambda: MappingProxyType({}))
    quantizer: Plan | None = None


class SmoothingModifier(Modifier):
    """Shared by SmoothQuant and AWQ: plans the balance Linears of every mapping and, per group
    of Linears that read one input, folds each mapping's scales in. Must come before the
    modifiers that quantize its layers."""

    quantizes: ClassVar[bool] = False
    # how the subclass's `mappings` argument is written (llm-compressor's form differs between them)
    parse_mappings: ClassVar[Callable[[Any, str], list[MappingSpec]]]
    ignore: list[str] = []

    @field_validator("mappings", check_fields=False)
    @classmethod
    def _mappings_form(cls, value: Any) -> Any:
        if value is not None:
            cls.parse_mappings(value, cls.__name__)
        return value

    def specs(self) -> list[MappingSpec] | None:
        """The recipe's explicit mappings; None derives them from the architecture."""
        # each subclass declares `mappings` itself, where its arguments list it
        return None if self.mappings is None else type(self).parse_mappings(self.mappings, type(self).__name__)

    def keep(self, mappings: list[Mapping], modules: dict[str, torch.nn.Module]) -> list[Mapping]:
        """The mappings to smooth, of those resolved and not ignored; all of them by default."""
        return mappings

    def scales(self, plan: SmoothingPlan, mapping: Mapping, balance: dict[str, torch.nn.Linear], stats: ActivationStats) -> torch.Tensor:
        """The per-channel scales s for one mapping, from the statistics of its balance input."""
        raise NotImplementedError

    def plan(self, model: torch.nn.Module) -> SmoothingPlan:
        name = type(self).__name__
        layers_prefix, layers = find_decoder_layers(model)
        resolved = resolve_mappings(model, layers_prefix, layers, self.specs(), name)
        modules = dict(model.named_modules())
        mappings = [m for m in resolved if not any(is_matched(n, modules[n], self.ignore) for n in (m.smooth, *m.balance))]
        if not mappings:
            raise ModelPressError(f"{name}: no mapping left to smooth in {type(model).__name__}; give mappings explicitly or shorten ignore")
        mappings = self.keep(mappings, modules)
        untie_from_embeddings(model, {n for m in mappings for n in (m.smooth, *m.balance)})
        touched = {n: modules[n] for m in mappings for n in (m.smooth, *m.balance, *m.scaled_too)}
        empty = QuantizationScheme(targets=["Linear"])
        targeted = {n: TargetedModule(n, "smoothing", empty) for m in mappings for n in m.balance}
        return SmoothingPlan(frozen(targeted), mappings=tuple(mappings), layers=MappingProxyType(touched))

    def needs_data(self) -> bool:
        return True

    def needs_ranges(self) -> bool:
        return True

    def bind(self, plan: Plan, earlier: list[Planned], later: list[Planned]) -> Plan:
        assert isinstance(plan, SmoothingPlan)
        for modifier, other in earlier:
            if modifier.quantizes and set(plan.layers) & set(other):
                raise ModelPressError(
                    f"recipe: {type(self).__name__} must come before {type(modifier).__name__}, which quantizes layers it scales"
                )
        return plan

    def apply(
        self, plan: Plan, modules: dict[str, torch.nn.Linear], stats: dict[str, ActivationStats], state: LayerState
    ) -> dict[str, QuantizedLinear]:
        assert isinstance(plan, SmoothingPlan)
        for mapping in plan.mappings:
            if not all(n in modules for n in mapping.balance):
                continue
            first = stats.get(mapping.balance[0])
            if first is None or first.channel_absmax is None:
                raise ModelPressError(f"{type(self).__name__}: no activation statistics for {mapping.balance[0]}; it needs calibration data")
            smooth = plan.layers[mapping.smooth]
            done = state.quantized.get(mapping.smooth)
            s = self.scales(plan, mapping, {n: modules[n] for n in mapping.balance}, first).to(smooth.weight.device)
            if isinstance(smooth, torch.nn.Linear):
                if done is not None:
                    if not fold_into_quantized_rows(smooth, done, s, mapping.rows):
                        log.warning("%s: %s is quantized per tensor and cannot absorb scales; mapping skipped", type(self).__name__, mapping.smooth)
                        continue
                else:
                    fold_into_rows(smooth, s, mapping.rows)
            else:
                fold_into_norm(smooth, s)
            for n in mapping.balance:
                fold_into_columns(modules[n], s)
            for n in mapping.scaled_too:
                fold_into_columns(plan.layers[n], s)
            for shared in {id(stats[n]): stats[n] for n in mapping.balance if n in stats}.values():
                rescale_inputs(shared, s, state.inputs)
        return {}
