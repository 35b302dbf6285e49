"""Round-to-nearest quantization (`QuantizationModifier`): each weight rounded to its nearest code.

The scales come from a min-max or MSE-clipping observer on the weight alone; calibration data is
read for static activation scales, and for `imatrix_mse`, whose clipping search weighs each input
column by E[x^2] of the Linear's inputs. GPTQ (gptq.py) takes its arguments and schemes from here
and replaces the rounding by its Hessian-compensated sweep.
"""

from typing import Any

import torch
from compressed_tensors.quantization import QuantizationScheme
from pydantic import PrivateAttr, model_validator

from modelpress.contract import shown
from modelpress.engine.errors import ModelPressError
from modelpress.engine.modifier import LayerState, Modifier, Plan, frozen
from modelpress.engine.quantize import (
    ObserverName,
    QParams,
    QuantizedLinear,
    dequantize,
    needs_importance,
    qparams_from_range,
    quantize,
    weight_observer,
)
from modelpress.engine.schemes import (
    SchemeInput,
    check_supported,
    needs_calibration,
    resolve_config_groups,
    resolve_scheme,
)
from modelpress.engine.statistics import ActivationStats
from modelpress.engine.targets import check_divisibility, resolve_targets, unused_patterns

class QuantizationModifier(Modifier):
    """Round-to-nearest quantization with a min-max or (importance-weighted) MSE-clipping weight observer."""

    config_groups: dict[str, Any] | None = None
    scheme: SchemeInput | None = None
    targets: list[str] | str = ["Linear"]
    ignore: list[str] = []
    weight_observer: ObserverName | None = None
    kv_cache_scheme: dict[str, Any] | None = None
    bypass_divisibility_checks: bool = False

    _groups: dict[str, QuantizationScheme] = PrivateAttr(default_factory=dict)

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
            weight_observer(self.observer_name(scheme))  # an unknown name fails here, before any work
        return self

    @property
    def groups(self) -> dict[str, QuantizationScheme]:
        """The resolved schemes by group name: a preset scheme becomes one group."""
        return self._groups

    def plan(self, model: torch.nn.Module) -> Plan:
        name = type(self).__name__
        all_targets = [t for s in self._groups.values() for t in s.targets]
        missing = unused_patterns(model, all_targets)
        if missing:
            raise ModelPressError(f"{name}.targets: {shown(missing)} match no module in the model; check the names")
        targeted = resolve_targets(model, self._groups, self.ignore)
        if not targeted:
            raise ModelPressError(f"{name}: targets {shown(all_targets)} minus ignore {shown(self.ignore)} leave no Linear to quantize")
        if not self.bypass_divisibility_checks:
            check_divisibility(model, targeted)
        return Plan(frozen(targeted), frozen(dict(self._groups)))

    def observer_name(self, scheme: QuantizationScheme) -> str:
        """The weight observer for a scheme: the modifier's `weight_observer`, else the scheme's own."""
        return self.weight_observer or scheme.weights.observer or "minmax"

    def needs_hessians(self) -> bool:
        return any(needs_importance(self.observer_name(s)) for s in self._groups.values())  # E[x^2] is diag(X^T X) / n

    def needs_ranges(self) -> bool:
        return any(needs_calibration(s) for s in self._groups.values())

    def needs_data(self) -> bool:
        return self.needs_ranges() or self.needs_hessians()  # weights alone need none

    def apply(
        self, plan: Plan, modules: dict[str, torch.nn.Linear], stats: dict[str, ActivationStats], state: LayerState
    ) -> dict[str, QuantizedLinear]:
        return {
            name: quantize_linear(module, plan[name].scheme, stats.get(name), self.observer_name(plan[name].scheme))
            for name, module in modules.items()
            if name in plan
        }


def quantize_linear(
    module: torch.nn.Linear,
    scheme: QuantizationScheme,
    stats: ActivationStats | None,
    observer: str = "minmax",
) -> QuantizedLinear:
    """Quantize one Linear in place (its weight becomes the dequantized codes) and return the codes."""
    w = module.weight.data
    args = scheme.weights
    qparams = weight_observer(observer)(w, args, w.dtype, importance(observer, stats))
    q = quantize(w, qparams, args)
    module.weight.data = dequantize(q, qparams, args)
    return QuantizedLinear(scheme, q, qparams, input_qparams(scheme, stats, w.dtype))


def importance(observer: str, stats: ActivationStats | None) -> torch.Tensor | None:
    """E[x^2] per input column where the observer weighs errors by it and it was gathered, else None."""
    if not needs_importance(observer) or stats is None or stats.xtx is None:
        return None
    return stats.mean_square


def input_qparams(scheme: QuantizationScheme, stats: ActivationStats | None, dtype: torch.dtype) -> QParams | None:
    """The static activation scale a scheme asks for, from the observed input range."""
    if not needs_calibration(scheme):
        return None
    if stats is None or stats.xmin is None:
        raise ModelPressError("static activation scales need calibration data; pass dataset=...")
    return qparams_from_range(stats.xmin.reshape(1), stats.xmax.reshape(1), scheme.input_activations, dtype)
