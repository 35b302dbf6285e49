"""Modifiers: what a recipe asks the engine to do, with llm-compressor's names and arguments.

A modifier plans which modules it touches before any work starts (so bad targets and group
sizes fail fast), says whether it needs calibration data, and then, once per decoder layer, turns
that layer's modules and their activation statistics into compressed weights.
"""

import re
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

import torch
from compressed_tensors.quantization import QuantizationScheme, QuantizationStrategy
from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, ValidationError, field_validator, model_validator

from modelpress.runner.engine.calibration import ActivationStats
from modelpress.runner.engine.errors import ModelPressError
from modelpress.runner.engine.gptq import gptq
from modelpress.runner.engine.quantize import (
    QParams,
    QuantizedLinear,
    dequantize,
    minmax_qparams,
    mse_qparams,
    qparams_from_range,
    quantize,
)
from modelpress.runner.engine.schemes import (
    SchemeInput,
    check_supported,
    needs_calibration,
    resolve_config_groups,
    resolve_scheme,
)
from modelpress.runner.engine.sparsegpt import sparsegpt
from modelpress.runner.engine.targets import (
    TargetedModule,
    check_divisibility,
    is_matched,
    resolve_targets,
    unused_patterns,
)

Observer = Literal["minmax", "mse", "memoryless_minmax", "memoryless_mse", "static_minmax"]


@dataclass
class LayerState:
    """What the modifiers of one decoder layer hand on to each other, and what they report."""

    masks: dict[str, torch.Tensor] = field(default_factory=dict)  # kept weights, after pruning
    losses: dict[str, float] = field(default_factory=dict)  # GPTQ/SparseGPT output-error estimate
    sparsity: dict[str, float] = field(default_factory=dict)
    dampening: dict[str, float] = field(default_factory=dict)  # only where it had to be raised


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

    def needs_data(self) -> bool:
        return any(needs_calibration(s) for s in self._groups.values())

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
    cls.__name__: cls for cls in (QuantizationModifier, GPTQModifier, SparseGPTModifier)
}
