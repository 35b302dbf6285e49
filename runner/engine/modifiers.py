"""Modifiers: what a recipe asks the engine to do, with llm-compressor's names and arguments.

A modifier plans which modules it touches before any work starts (so bad targets and group
sizes fail fast), says whether it needs calibration data, and then, once per decoder layer, turns
that layer's modules and their activation statistics into compressed weights.
"""

from typing import Any, ClassVar, Literal

import torch
from compressed_tensors.quantization import QuantizationScheme
from pydantic import BaseModel, ConfigDict, PrivateAttr, ValidationError, model_validator

from modelpress.runner.engine.calibration import ActivationStats
from modelpress.runner.engine.errors import ModelPressError
from modelpress.runner.engine.quantize import (
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
from modelpress.runner.engine.targets import TargetedModule, check_divisibility, resolve_targets, unused_patterns

Observer = Literal["minmax", "mse", "memoryless_minmax", "memoryless_mse", "static_minmax"]


class Modifier(BaseModel):
    """Base of every modifier: strict arguments, a plan, and per-layer work."""

    model_config = ConfigDict(extra="forbid", arbitrary_types_allowed=True)
    needs_hessians: ClassVar[bool] = False

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
        self, modules: dict[str, torch.nn.Linear], stats: dict[str, ActivationStats]
    ) -> dict[str, QuantizedLinear]:
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
        self, modules: dict[str, torch.nn.Linear], stats: dict[str, ActivationStats]
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
    input_qparams = None
    if needs_calibration(scheme):
        if stats is None or stats.xmin is None:
            raise ModelPressError("static activation scales need calibration data; pass dataset=...")
        input_qparams = qparams_from_range(stats.xmin.reshape(1), stats.xmax.reshape(1), scheme.input_activations, w.dtype)
    return QuantizedLinear(scheme, q, qparams, input_qparams)


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


MODIFIERS: dict[str, type[Modifier]] = {"QuantizationModifier": QuantizationModifier}
