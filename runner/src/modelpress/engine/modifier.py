"""What every modifier shares: strict arguments, a frozen plan, and per-layer work.

A modifier is what a recipe asks the engine to do, with llm-compressor's names and arguments. It
plans which modules it touches before any work starts (so bad targets and group sizes fail fast),
says whether it needs calibration data, and then, once per decoder layer, turns that layer's
modules and their activation statistics into compressed weights.

The plan is a value the pipeline holds and hands back to `apply`: a modifier keeps no state
between planning and applying, and never reads another modifier's. What one needs of another
(AWQ: the schemes of the quantizer after it) is passed to `bind` explicitly.
"""

from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, ClassVar

import torch
from compressed_tensors.quantization import QuantizationScheme
from pydantic import BaseModel, ConfigDict, ValidationError

from modelpress.contract import shown
from modelpress.engine.errors import ModelPressError
from modelpress.engine.activations import Rows
from modelpress.engine.quantize import QuantizedLinear
from modelpress.engine.statistics import ActivationStats
from modelpress.engine.targets import TargetedModule


@dataclass(frozen=True, eq=False)
class Plan(Mapping[str, TargetedModule]):
    """The modules one modifier touches, each with its scheme, as a read-only mapping by name.

    `groups` are the quantization groups its schemes come from (what config.json lists); a
    modifier that does not quantize has none.
    """

    targeted: Mapping[str, TargetedModule]
    groups: Mapping[str, QuantizationScheme] = field(default_factory=lambda: MappingProxyType({}))

    def __getitem__(self, name: str) -> TargetedModule:
        return self.targeted[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self.targeted)

    def __len__(self) -> int:
        return len(self.targeted)

    def __contains__(self, name: object) -> bool:
        return name in self.targeted


def frozen(mapping: dict[str, Any]) -> Mapping[str, Any]:
    """A read-only view, so that a plan cannot be changed after it was made."""
    return MappingProxyType(mapping)


@dataclass
class LayerState:
    """What the modifiers of one decoder layer hand on to each other, and what they report."""

    masks: dict[str, torch.Tensor] = field(default_factory=dict)  # kept weights, after pruning
    losses: dict[str, float] = field(default_factory=dict)  # GPTQ/SparseGPT output-error estimate
    sparsity: dict[str, float] = field(default_factory=dict)
    dampening: dict[str, float] = field(default_factory=dict)  # only where it had to be raised
    # sequential path: the current group's inputs, which smoothing rescales in place, and what
    # earlier groups of the layer quantized (a smooth Linear may already be quantized)
    inputs: Rows | None = None
    quantized: dict[str, QuantizedLinear] = field(default_factory=dict)


Planned = tuple["Modifier", Plan]  # a modifier of the recipe beside its plan


class Modifier(BaseModel):
    """Base of every modifier: strict arguments, a plan, and per-layer work."""

    model_config = ConfigDict(extra="forbid", arbitrary_types_allowed=True)
    quantizes: ClassVar[bool] = True  # a module takes at most one quantizing modifier

    def __init__(self, **kwargs: Any) -> None:
        try:
            super().__init__(**kwargs)
        except ValidationError as err:
            raise ModelPressError(describe_errors(type(self), err)) from None

    def plan(self, model: torch.nn.Module) -> Plan:
        """The modules this modifier will touch in `model`; raises on targets that cannot work."""
        raise NotImplementedError

    def needs_data(self) -> bool:
        raise NotImplementedError

    def needs_hessians(self) -> bool:
        """Whether it reads X^T X of its Linears' inputs (GPTQ, SparseGPT, AWQ, imatrix_mse)."""
        return False

    def needs_float_inputs(self) -> bool:
        """Whether it reads the float model's inputs to its Linears beside the compressed model's
        (GPTQ aimed at the float output): the pass then carries a float stream of hidden states."""
        return False

    def needs_ranges(self) -> bool:
        """Whether it reads the inputs' ranges (static activation scales, smoothing); gathering
        them costs two passes over every input."""
        return False

    def bind(self, plan: Plan, earlier: list[Planned], later: list[Planned]) -> Plan:
        """Check this modifier's place in the planned recipe and return the plan `apply` gets,
        with whatever it needs of the modifiers around it."""
        return plan

    def transform_model(self, plan: Plan, model: torch.nn.Module, read: Callable[[str], torch.Tensor]) -> Plan:
        """Change the float parts outside the decoder layers (in memory now) before anything is
        calibrated, and return the plan the layers get; `read` gives any parameter's float value by
        name, layers included. Most modifiers change nothing here (rotations do)."""
        return plan

    def transform_layer(self, plan: Plan, layer: torch.nn.Module, prefix: str) -> None:
        """Change a decoder layer's float weights as it is read, before any modifier calibrates it."""

    def apply(
        self, plan: Plan, modules: dict[str, torch.nn.Linear], stats: dict[str, ActivationStats], state: LayerState
    ) -> dict[str, QuantizedLinear]:
        """Compress `modules` (planned ones) in place; return the quantized ones (pruning returns none)."""
        raise NotImplementedError


def plan_recipe(modifiers: list[Modifier], model: torch.nn.Module) -> list[Plan]:
    """Every modifier's plan, checked against the others and bound to its place in the recipe."""
    plans = [m.plan(model) for m in modifiers]
    owners: dict[str, str] = {}
    for modifier, plan in zip(modifiers, plans):
        if not modifier.quantizes:
            continue
        for name in plan:
            if name in owners:
                raise ModelPressError(
                    f"recipe: {name} is quantized by both {owners[name]} and {type(modifier).__name__}; "
                    "narrow their targets or use ignore"
                )
            owners[name] = type(modifier).__name__
    planned = list(zip(modifiers, plans))
    return [m.bind(plan, planned[:i], planned[i + 1 :]) for i, (m, plan) in enumerate(planned)]


def describe_errors(cls: type[Modifier], err: ValidationError) -> str:
    """One line per problem, naming the argument; unknown ones list the valid arguments."""
    problems = []
    for e in err.errors():
        where = ".".join(str(p) for p in e["loc"])
        if e["type"] == "extra_forbidden":
            valid = ", ".join(cls.model_fields)
            problems.append(f"{cls.__name__}: unknown argument {shown(where)}; valid arguments: {valid}")
        elif e["type"] == "value_error":
            problems.append(str(e["ctx"]["error"]))
        else:
            problems.append(f"{cls.__name__}.{where}: {e['msg']}")
    return "; ".join(problems)
