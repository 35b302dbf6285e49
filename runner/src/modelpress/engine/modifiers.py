"""Modifiers: what a recipe asks the engine to do, with llm-compressor's names and arguments.

A modifier plans which modules it touches before any work starts (so bad targets and group
sizes fail fast), says whether it needs calibration data, and then, once per decoder layer, turns
that layer's modules and their activation statistics into compressed weights.
"""

import logging
import re
from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar, Literal

import torch
from compressed_tensors.quantization import QuantizationScheme, QuantizationStrategy
from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, ValidationError, field_validator, model_validator

from modelpress.engine.awq import feeds_attention_scores, search_clip, search_scales
from modelpress.engine.calibration import ActivationStats
from modelpress.engine.errors import ModelPressError
from modelpress.engine.gptq import gptq
from modelpress.engine.mappings import (
    Mapping,
    MappingSpec,
    parse_awq_mappings,
    parse_smoothquant_mappings,
    resolve_mappings,
)
from modelpress.engine.quantize import (
    QParams,
    QuantizedLinear,
    dequantize,
    minmax_qparams,
    mse_qparams,
    qparams_from_range,
    quantize,
)
from modelpress.engine.schemes import (
    SchemeInput,
    check_supported,
    needs_calibration,
    resolve_config_groups,
    resolve_scheme,
)
from modelpress.engine.smoothing import (
    fold_into_columns,
    fold_into_norm,
    fold_into_quantized_rows,
    fold_into_rows,
    rescale_inputs,
    smoothquant_scales,
)
from modelpress.engine.layer_pass import GroupInput
from modelpress.engine.sparsegpt import sparsegpt
from modelpress.engine.targets import (
    TargetedModule,
    check_divisibility,
    is_matched,
    resolve_targets,
    unused_patterns,
)
from modelpress.engine.weights import find_decoder_layers

log = logging.getLogger(__name__)

Observer = Literal["minmax", "mse", "memoryless_minmax", "memoryless_mse", "static_minmax"]


@dataclass
class LayerState:
    """What the modifiers of one decoder layer hand on to each other, and what they report."""

    masks: dict[str, torch.Tensor] = field(default_factory=dict)  # kept weights, after pruning
    losses: dict[str, float] = field(default_factory=dict)  # GPTQ/SparseGPT output-error estimate
    sparsity: dict[str, float] = field(default_factory=dict)
    dampening: dict[str, float] = field(default_factory=dict)  # only where it had to be raised
    # sequential path: the current group's inputs, which smoothing rescales in place, and what
    # earlier groups of the layer quantized (a smooth Linear may already be quantized)
    inputs: GroupInput | None = None
    quantized: dict[str, QuantizedLinear] = field(default_factory=dict)


class Modifier(BaseModel):
    """Base of every modifier: strict arguments, a plan, and per-layer work."""

    model_config = ConfigDict(extra="forbid", arbitrary_types_allowed=True)
    needs_hessians: ClassVar[bool] = False
    quantizes: ClassVar[bool] = True  # a module takes at most one quantizing modifier

    def __init__(self, **kwargs: Any) -> None:
        try:
            super().__init__(**kwargs)
        except ValidationError as err:
            raise ModelPressError(_describe(type(self), err)) from None

    def plan(self, model: torch.nn.Module) -> dict[str, TargetedModule]:
        raise NotImplementedError

    def needs_data(self) -> bool:
        raise NotImplementedError

    def needs_ranges(self) -> bool:
        """Whether it reads the inputs' ranges (static activation scales, smoothing); gathering
        them costs two passes over every input."""
        return False

    def bind(self, recipe: list["Modifier"]) -> None:
        """Check this modifier's place in the planned recipe (every modifier planned first)."""

    def apply(
        self, modules: dict[str, torch.nn.Linear], stats: dict[str, ActivationStats], state: LayerState
    ) -> dict[str, QuantizedLinear]:
        """Compress `modules` in place; return the quantized ones (pruning returns none)."""
        raise NotImplementedError


class QuantizationModifier(Modifier):
    """Round-to-nearest quantization with a min-max or MSE-clipping weight observer."""

    config_groups: dict[str, Any] | None = None
    scheme: SchemeInput | None = None
    targets: list[str] | str = ["Linear"]
    ignore: list[str] = []
    weight_observer: Observer | None = None
    kv_cache_scheme: dict[str, Any] | None = None
    bypass_divisibility_checks: bool = False

    _groups: dict[str, QuantizationScheme] = PrivateAttr(default_factory=dict)
    _plan: dict[str, TargetedModule] = PrivateAttr(default_factory=dict)

    @model_validator(mode="after")
    def _resolve(self) -> "QuantizationModifier":
        name = type(self).__name__
        if (self.scheme is None) == (self.config_groups is None):
            raise ModelPressError(f"{name}: give exactly one of scheme (e.g. W4A16) or config_groups")
        if self.kv_cache_scheme is not None:
            raise ModelPressError(f"{name}.kv_cache_scheme: KV-cache quantization is not supported yet; remove it")
        targets = [self.targets] if isinstance(self.targets, str) else list(self.targets)
        if self.scheme is not None:
            self._groups = resolve_scheme(self.scheme, targets)
        else:
            self._groups = resolve_config_groups(self.config_groups or {})
        for group, scheme in self._groups.items():
            check_supported(scheme, f"{name}.{group}")
        return self

    @property
    def groups(self) -> dict[str, QuantizationScheme]:
        return self._groups

    def plan(self, model: torch.nn.Module) -> dict[str, TargetedModule]:
        name = type(self).__name__
        all_targets = [t for s in self._groups.values() for t in s.targets]
        missing = unused_patterns(model, all_targets)
        if missing:
            raise ModelPressError(f"{name}.targets: {missing} match no module in the model; check the names")
        self._plan = resolve_targets(model, self._groups, self.ignore)
        if not self._plan:
            raise ModelPressError(f"{name}: targets {all_targets} minus ignore {self.ignore} leave no Linear to quantize")
        if not self.bypass_divisibility_checks:
            check_divisibility(model, self._plan)
        return self._plan

    def needs_ranges(self) -> bool:
        return any(needs_calibration(s) for s in self._groups.values())

    def needs_data(self) -> bool:
        return self.needs_ranges()  # static activation scales; weights alone need none

    def apply(
        self, modules: dict[str, torch.nn.Linear], stats: dict[str, ActivationStats], state: LayerState
    ) -> dict[str, QuantizedLinear]:
        return {
            name: quantize_linear(module, self._plan[name].scheme, stats.get(name), self.weight_observer)
            for name, module in modules.items()
            if name in self._plan
        }


def quantize_linear(
    module: torch.nn.Linear,
    scheme: QuantizationScheme,
    stats: ActivationStats | None,
    observer: str | None = None,
) -> QuantizedLinear:
    """Quantize one Linear in place (its weight becomes the dequantized codes) and return the codes."""
    w = module.weight.data
    args = scheme.weights
    observer = observer or args.observer or "minmax"
    qparams = mse_qparams(w, args, w.dtype) if "mse" in observer else minmax_qparams(w, args, w.dtype)
    q = quantize(w, qparams, args)
    module.weight.data = dequantize(q, qparams, args)
    return QuantizedLinear(scheme, q, qparams, _input_qparams(scheme, stats, w.dtype))


def _input_qparams(scheme: QuantizationScheme, stats: ActivationStats | None, dtype: torch.dtype) -> QParams | None:
    """The static activation scale a scheme asks for, from the observed input range."""
    if not needs_calibration(scheme):
        return None
    if stats is None or stats.xmin is None:
        raise ModelPressError("static activation scales need calibration data; pass dataset=...")
    return qparams_from_range(stats.xmin.reshape(1), stats.xmax.reshape(1), scheme.input_activations, dtype)


class GPTQModifier(QuantizationModifier):
    """GPTQ: quantization that compensates each column's rounding error through the Hessian.

    Linears that read the same input (q/k/v, gate/up) share one Hessian and are solved as one
    stacked matrix, which gives the same result per row in fewer, larger steps.
    """

    needs_hessians: ClassVar[bool] = True
    block_size: int = Field(128, ge=1)
    dampening_frac: float = Field(0.01, gt=0)
    actorder: Literal["static", "weight"] | None = "static"
    offload_hessians: bool = False

    @field_validator("actorder", mode="before")
    @classmethod
    def _actorder(cls, value: Any) -> Any:
        if value in ("group", "dynamic", True):
            raise ModelPressError(
                f"GPTQModifier.actorder: {value!r} (g_idx) was removed from compressed-tensors 0.20 and vLLM; "
                "use 'static' (activation order, stored in natural order) or null"
            )
        return None if value is False else value

    @model_validator(mode="after")
    def _record_actorder(self) -> "GPTQModifier":
        for scheme in self._groups.values():  # the checkpoint says how group scales were found
            w = scheme.weights
            if w is not None and w.strategy == QuantizationStrategy.GROUP and w.actorder is None and self.actorder:
                w.actorder = self.actorder
        return self

    def needs_data(self) -> bool:
        return True

    def apply(
        self, modules: dict[str, torch.nn.Linear], stats: dict[str, ActivationStats], state: LayerState
    ) -> dict[str, QuantizedLinear]:
        done: dict[str, QuantizedLinear] = {}
        for names in _stacks(modules, stats, self._plan):
            scheme = self._plan[names[0]].scheme
            args = scheme.weights
            weights = [modules[n].weight.data for n in names]
            if stats.get(names[0]) is None or stats[names[0]].xtx is None:
                raise ModelPressError(f"GPTQModifier: no Hessian for {names[0]}; GPTQ needs calibration data")
            keep = None
            if any(n in state.masks for n in names):
                keep = torch.cat([state.masks.get(n, torch.ones_like(w, dtype=torch.bool)) for n, w in zip(names, weights)])
            result = gptq(
                torch.cat(weights),
                stats[names[0]].hessian.to(weights[0].device),
                args,
                self.block_size,
                self.dampening_frac,
                actorder=self.actorder is not None,
                observer=mse_qparams if "mse" in (self.weight_observer or args.observer or "") else minmax_qparams,
                keep=keep,
            )
            rows = [w.shape[0] for w in weights]
            for name, q, scale, zp, row_loss in zip(
                names,
                result.q.split(rows),
                _split_rows(result.qparams.scale, rows),
                _split_rows(result.qparams.zero_point, rows),
                result.row_loss.split(rows),
            ):
                qparams = QParams(scale, zp)
                modules[name].weight.data = dequantize(q, qparams, args)
                done[name] = QuantizedLinear(scheme, q, qparams, _input_qparams(scheme, stats.get(name), scale.dtype))
                state.losses[name] = float(row_loss.sum())
                if result.dampening_frac != self.dampening_frac:
                    state.dampening[name] = result.dampening_frac
        return done


def _stacks(
    modules: dict[str, torch.nn.Linear], stats: dict[str, ActivationStats], plan: dict[str, TargetedModule]
) -> list[list[str]]:
    """Modules that share a Hessian and a per-row scheme, as lists to solve together."""
    stacks: dict[tuple[Any, ...], list[str]] = {}
    for name in modules:
        scheme = plan[name].scheme
        per_tensor = scheme.weights.strategy == QuantizationStrategy.TENSOR  # one scale: rows not separable
        key = (name,) if per_tensor else (id(stats.get(name)), id(scheme))
        stacks.setdefault(key, []).append(name)
    return list(stacks.values())


def _split_rows(t: torch.Tensor | None, rows: list[int]) -> list[torch.Tensor | None]:
    if t is None or len(rows) == 1:  # one module: per-tensor parameters have no rows to split
        return [t] * len(rows)
    return list(t.split(rows))


class SparseGPTModifier(Modifier):
    """SparseGPT pruning: unstructured or N:M, weights stay dense with zeros.

    Followed by GPTQModifier or QuantizationModifier in the same recipe, the pruned weights stay
    zero: every scheme maps 0 to 0, and GPTQ is told the mask.
    """

    needs_hessians: ClassVar[bool] = True
    quantizes: ClassVar[bool] = False
    sparsity: float | None = Field(None, gt=0, lt=1)
    mask_structure: str = "0:0"
    block_size: int = Field(128, ge=1)
    dampening_frac: float = Field(0.01, gt=0)
    preserve_sparsity_mask: bool = False
    offload_hessians: bool = False
    targets: list[str] | str = ["Linear"]
    ignore: list[str] = []

    _nm: tuple[int, int] = PrivateAttr(default=(0, 0))
    _plan: dict[str, TargetedModule] = PrivateAttr(default_factory=dict)

    @model_validator(mode="after")
    def _resolve(self) -> "SparseGPTModifier":
        match = re.fullmatch(r"(\d+):(\d+)", self.mask_structure)
        if not match or (int(match[1]) == 0) != (int(match[2]) == 0) or int(match[1]) >= max(int(match[2]), 1):
            raise ModelPressError(
                f"SparseGPTModifier.mask_structure: {self.mask_structure!r} is not '0:0' (unstructured) or 'N:M' with N < M, e.g. '2:4'"
            )
        n, m = int(match[1]), int(match[2])
        self._nm = (n, m)
        if n and self.sparsity is not None and abs(self.sparsity - n / m) > 1e-6:
            raise ModelPressError(
                f"SparseGPTModifier.sparsity: {self.sparsity} contradicts mask_structure {self.mask_structure} "
                f"({n / m:g}); drop sparsity or set it to {n / m:g}"
            )
        if not n and self.sparsity is None:
            raise ModelPressError("SparseGPTModifier.sparsity: required for unstructured pruning, e.g. sparsity: 0.5")
        return self

    def plan(self, model: torch.nn.Module) -> dict[str, TargetedModule]:
        targets = [self.targets] if isinstance(self.targets, str) else list(self.targets)
        missing = unused_patterns(model, targets)
        if missing:
            raise ModelPressError(f"SparseGPTModifier.targets: {missing} match no module in the model; check the names")
        empty = QuantizationScheme(targets=targets)
        self._plan = {
            name: TargetedModule(name, "sparsity", empty)
            for name, module in model.named_modules()
            if isinstance(module, torch.nn.Linear) and is_matched(name, module, targets) and not is_matched(name, module, self.ignore)
        }
        if not self._plan:
            raise ModelPressError(f"SparseGPTModifier: targets {targets} minus ignore {self.ignore} leave no Linear to prune")
        _, m = self._nm
        bad = [n for n in self._plan if m and model.get_submodule(n).in_features % m]
        if bad:
            raise ModelPressError(f"SparseGPTModifier.mask_structure: {self.mask_structure} needs input features divisible by {m}; {bad[:4]} are not; add them to ignore")
        return self._plan

    def needs_data(self) -> bool:
        return True

    def apply(
        self, modules: dict[str, torch.nn.Linear], stats: dict[str, ActivationStats], state: LayerState
    ) -> dict[str, QuantizedLinear]:
        n, m = self._nm
        sparsity = n / m if n else float(self.sparsity or 0)
        for name, module in modules.items():
            if stats.get(name) is None or stats[name].xtx is None:
                raise ModelPressError(f"SparseGPTModifier: no Hessian for {name}; SparseGPT needs calibration data")
            w = module.weight.data
            result = sparsegpt(
                w, stats[name].hessian.to(w.device), sparsity, n, m, self.block_size, self.dampening_frac, self.preserve_sparsity_mask
            )
            module.weight.data = result.weight
            state.masks[name] = result.keep
            state.losses[name] = float(result.row_loss.sum())
            state.sparsity[name] = 1 - float(result.keep.float().mean())
            if result.dampening_frac != self.dampening_frac:
                state.dampening[name] = result.dampening_frac
        return {}


class SmoothingModifier(Modifier):
    """Shared by SmoothQuant and AWQ: per-channel scales moved from activations into weights.

    Plans the balance Linears of every mapping; per group of Linears that read one input, finds
    each mapping's scales from that input's statistics, folds them in (the float model computes
    the same), and rescales the collected inputs and statistics so that the quantizer after it
    sees the smoothed model without another calibration pass. Must come before the modifiers
    that quantize its layers.
    """

    quantizes: ClassVar[bool] = False
    ignore: list[str] = []

    _mappings: list[Mapping] = PrivateAttr(default_factory=list)
    _modules: dict[str, torch.nn.Module] = PrivateAttr(default_factory=dict)
    _plan: dict[str, TargetedModule] = PrivateAttr(default_factory=dict)

    def specs(self) -> list[MappingSpec] | None:
        raise NotImplementedError

    def scales(self, mapping: Mapping, balance: dict[str, torch.nn.Linear], stats: ActivationStats) -> torch.Tensor:
        raise NotImplementedError

    def plan(self, model: torch.nn.Module) -> dict[str, TargetedModule]:
        name = type(self).__name__
        layers_prefix, layers = find_decoder_layers(model)
        mappings = resolve_mappings(model, layers_prefix, layers, self.specs(), name)
        modules = dict(model.named_modules())
        self._mappings = [
            m for m in mappings if not any(is_matched(n, modules[n], self.ignore) for n in (m.smooth, *m.balance))
        ]
        if not self._mappings:
            raise ModelPressError(f"{name}: no mapping left to smooth in {type(model).__name__}; give mappings explicitly or shorten ignore")
        _untie_from_embeddings(model, {n for m in self._mappings for n in (m.smooth, *m.balance)})
        self._modules = {n: modules[n] for m in self._mappings for n in (m.smooth, *m.balance, *m.scaled_too)}
        empty = QuantizationScheme(targets=["Linear"])
        self._plan = {n: TargetedModule(n, "smoothing", empty) for m in self._mappings for n in m.balance}
        return self._plan

    def needs_data(self) -> bool:
        return True

    def needs_ranges(self) -> bool:
        return True

    def bind(self, recipe: list[Modifier]) -> None:
        mine = set(self._modules)
        for earlier in recipe[: recipe.index(self)]:
            if earlier.quantizes and mine & set(getattr(earlier, "_plan", {})):
                raise ModelPressError(
                    f"recipe: {type(self).__name__} must come before {type(earlier).__name__}, which quantizes layers it scales"
                )

    def apply(
        self, modules: dict[str, torch.nn.Linear], stats: dict[str, ActivationStats], state: LayerState
    ) -> dict[str, QuantizedLinear]:
        for mapping in self._mappings:
            if not all(n in modules for n in mapping.balance):
                continue
            first = stats.get(mapping.balance[0])
            if first is None or first.channel_absmax is None:
                raise ModelPressError(f"{type(self).__name__}: no activation statistics for {mapping.balance[0]}; it needs calibration data")
            smooth = self._modules[mapping.smooth]
            done = state.quantized.get(mapping.smooth)
            s = self.scales(mapping, {n: modules[n] for n in mapping.balance}, first).to(smooth.weight.device)
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
                fold_into_columns(self._modules[n], s)
            for shared in {id(stats[n]): stats[n] for n in mapping.balance if n in stats}.values():
                rescale_inputs(shared, s, state.inputs)
        return {}


def _untie_from_embeddings(model: torch.nn.Module, names: set[str]) -> None:
    """Give a module whose weight is the input embeddings its own copy before anything is folded into it."""
    embeddings = model.get_input_embeddings().weight if hasattr(model, "get_input_embeddings") else None
    for name in names:
        module = model.get_submodule(name)
        if embeddings is not None and module.weight is embeddings:
            module.weight = torch.nn.Parameter(embeddings.data.clone(), requires_grad=False)
            model.config.tie_word_embeddings = False


class SmoothQuantModifier(SmoothingModifier):
    """SmoothQuant: s_j = max|X_j|^alpha / max|W_j|^(1 - alpha) flattens activation outliers for W8A8."""

    smoothing_strength: float = Field(0.5, ge=0, le=1)
    mappings: list[Any] | None = None

    @field_validator("mappings")
    @classmethod
    def _mappings_form(cls, value: Any) -> Any:
        if value is not None:
            parse_smoothquant_mappings(value, "SmoothQuantModifier")
        return value

    def specs(self) -> list[MappingSpec] | None:
        return None if self.mappings is None else parse_smoothquant_mappings(self.mappings, type(self).__name__)

    def plan(self, model: torch.nn.Module) -> dict[str, TargetedModule]:
        """Derived mappings keep the norms only: on SmolLM2, W8A8 RTN after smoothing norms alone
        measured +1.06% perplexity, and +1.46% with v -> o and up -> down folded as well."""
        plan = super().plan(model)
        if self.mappings is None:
            self._mappings = [m for m in self._mappings if not isinstance(self._modules[m.smooth], torch.nn.Linear)]
            kept = {n for m in self._mappings for n in (m.smooth, *m.balance, *m.scaled_too)}
            self._modules = {n: module for n, module in self._modules.items() if n in kept}
            self._plan = {n: t for n, t in plan.items() if n in kept}
        return self._plan

    def scales(self, mapping: Mapping, balance: dict[str, torch.nn.Linear], stats: ActivationStats) -> torch.Tensor:
        return smoothquant_scales(stats.channel_absmax, [m.weight.data for m in balance.values()], self.smoothing_strength)


class AWQModifier(SmoothingModifier):
    """AWQ: per mapping, the grid-searched scales that minimize the balance Linears' output error
    once quantized with the scheme of the quantizing modifier that follows it in the recipe.

    With `apply_clip` (AutoAWQ's name), the scaled balance Linears are then clipped per row and
    group to the range with least output error (see awq.py), except q/k, which feed attention scores.
    """

    needs_hessians: ClassVar[bool] = True  # the search reads the inputs through X^T X (see awq.py)
    mappings: list[Any] | None = None
    duo_scaling: bool | Literal["both"] = True
    n_grid: int = Field(20, ge=1)
    offload_device: str | None = None  # accepted for recipes: the search holds one group's X^T X, nothing to offload
    apply_clip: bool = False
    clip_n_grid: int = Field(20, ge=1)
    clip_max_shrink: float = Field(0.5, gt=0, lt=1)

    _follower: QuantizationModifier | None = PrivateAttr(default=None)

    @field_validator("mappings")
    @classmethod
    def _mappings_form(cls, value: Any) -> Any:
        if value is not None:
            parse_awq_mappings(value, "AWQModifier")
        return value

    def specs(self) -> list[MappingSpec] | None:
        return None if self.mappings is None else parse_awq_mappings(self.mappings, type(self).__name__)

    def bind(self, recipe: list[Modifier]) -> None:
        super().bind(recipe)
        later = [m for m in recipe[recipe.index(self) + 1 :] if isinstance(m, QuantizationModifier)]
        if not later:
            raise ModelPressError(
                "recipe: AWQModifier scales weights for the quantizer after it; add a QuantizationModifier or GPTQModifier after it"
            )
        self._follower = later[0]

    def scales(self, mapping: Mapping, balance: dict[str, torch.nn.Linear], stats: ActivationStats) -> torch.Tensor:
        if self._follower is None:
            raise ModelPressError("AWQModifier: no quantizer follows it in the recipe")
        if stats.xtx is None:
            raise ModelPressError(f"AWQModifier: no X^T X for {mapping.balance[0]}; AWQ needs calibration data")
        plan = self._follower._plan
        schemes = [plan[n].scheme if n in plan else None for n in balance]
        fakes = [_fake_quantizer(s) if s is not None and s.weights is not None else None for s in schemes]
        grouped_ = [s.weights for s in schemes if s is not None and s.weights is not None]
        group_size = grouped_[0].group_size if grouped_ and grouped_[0].strategy == QuantizationStrategy.GROUP else None
        weights = [m.weight.data for m in balance.values()]
        duos = [True, False] if self.duo_scaling == "both" else [bool(self.duo_scaling)]
        results = [search_scales(stats.gram, stats.tokens, weights, fakes, group_size, self.n_grid, d) for d in duos]
        return min(results, key=lambda r: r.loss).scales

    def apply(
        self, modules: dict[str, torch.nn.Linear], stats: dict[str, ActivationStats], state: LayerState
    ) -> dict[str, QuantizedLinear]:
        done = super().apply(modules, stats, state)
        if self.apply_clip:
            for mapping in self._mappings:
                if all(n in modules for n in mapping.balance):
                    self._clip({n: modules[n] for n in mapping.balance}, stats[mapping.balance[0]])
        return done

    def _clip(self, balance: dict[str, torch.nn.Linear], stats: ActivationStats) -> None:
        """Clip the balance Linears the follower quantizes per row (channel or group scales); a
        per-tensor scale couples every row, so those are left as they are. `stats` already
        describes the scaled inputs (rescale_inputs)."""
        plan = self._follower._plan
        per_row = (QuantizationStrategy.GROUP, QuantizationStrategy.CHANNEL)
        args = {n: plan[n].scheme.weights for n in balance if n in plan and not feeds_attention_scores(n)}
        args = {n: a for n, a in args.items() if a is not None and a.strategy in per_row}
        if not args:
            return
        gram = stats.gram
        for name, a in args.items():
            w = balance[name].weight.data
            group_size = a.group_size if a.strategy == QuantizationStrategy.GROUP else None
            fake = _fake_quantizer(plan[name].scheme)
            result = search_clip(w, gram, fake, group_size, a.symmetric, self.clip_n_grid, self.clip_max_shrink)
            balance[name].weight.data = result.weight.to(w.dtype)
            log.debug("AWQ clip %s: group output error %.4g -> %.4g", name, float(result.unclipped_loss.sum()), float(result.loss.sum()))


def _fake_quantizer(scheme: QuantizationScheme) -> Callable[[torch.Tensor], torch.Tensor]:
    """Round-to-nearest with min-max scales: the quantization AWQ searches against."""
    args = scheme.weights

    def fake(w: torch.Tensor) -> torch.Tensor:
        qparams = minmax_qparams(w, args, torch.float32)
        return dequantize(quantize(w, qparams, args), qparams, args)

    return fake


def _describe(cls: type[Modifier], err: ValidationError) -> str:
    """One line per problem, naming the argument; unknown ones list the valid arguments."""
    problems = []
    for e in err.errors():
        where = ".".join(str(p) for p in e["loc"])
        if e["type"] == "extra_forbidden":
            valid = ", ".join(cls.model_fields)
            problems.append(f"{cls.__name__}: unknown argument {where!r}; valid arguments: {valid}")
        elif e["type"] == "value_error":
            problems.append(str(e["ctx"]["error"]))
        else:
            problems.append(f"{cls.__name__}.{where}: {e['msg']}")
    return "; ".join(problems)


MODIFIERS: dict[str, type[Modifier]] = {
    cls.__name__: cls
    for cls in (QuantizationModifier, GPTQModifier, SparseGPTModifier, SmoothQuantModifier, AWQModifier)
}
