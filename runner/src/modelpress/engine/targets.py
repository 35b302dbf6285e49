"""Which modules a modifier touches: llm-compressor's target language, and the preflight checks.

A target is an exact module name, `re:<pattern>` (re.match on the full name), or a class name
matching the module's class or any base class. When several groups match, the most specific wins:
exact name, then regex, then class.
"""

import re
from dataclasses import dataclass

import torch
from compressed_tensors.quantization import QuantizationScheme, QuantizationStrategy

from modelpress.engine.errors import ModelPressError

_EXACT, _REGEX, _CLASS = 3, 2, 1
# Linears that only decide routing (one output feature): vLLM builds them unquantized, so they stay float
ROUTING_GATES = ("shared_expert_gate",)


def match_rank(name: str, module: torch.nn.Module, target: str) -> int:
    """How specifically `target` names this module (0: not at all)."""
    if target.startswith("re:"):
        return _REGEX if re.match(target[3:], name) else 0
    if target == name:
        return _EXACT
    if any(cls.__name__ == target for cls in type(module).__mro__):
        return _CLASS
    return 0


def is_matched(name: str, module: torch.nn.Module, targets: list[str]) -> bool:
    return any(match_rank(name, module, t) for t in targets)


@dataclass(frozen=True)
class TargetedModule:
    name: str
    group: str
    scheme: QuantizationScheme


def resolve_targets(
    model: torch.nn.Module, groups: dict[str, QuantizationScheme], ignore: list[str]
) -> dict[str, TargetedModule]:
    """Map every Linear a group targets (and `ignore` spares) to that group's scheme."""
    resolved: dict[str, TargetedModule] = {}
    for name, module in model.named_modules():
        if not isinstance(module, torch.nn.Linear) or is_matched(name, module, ignore) or name.rsplit(".", 1)[-1] in ROUTING_GATES:
            continue
        best_rank, best = 0, None
        for group, scheme in groups.items():
            rank = max((match_rank(name, module, t) for t in scheme.targets), default=0)
            if rank > best_rank:
                best_rank, best = rank, TargetedModule(name, group, scheme)
        if best is not None:
            resolved[name] = best
    return resolved


def unused_patterns(model: torch.nn.Module, patterns: list[str]) -> list[str]:
    """Targets/ignores that name no module at all: almost always a typo worth reporting."""
    modules = list(model.named_modules())
    return [p for p in patterns if not any(match_rank(n, m, p) for n, m in modules)]


def check_divisibility(model: torch.nn.Module, targeted: dict[str, TargetedModule]) -> None:
    """Stop before any work when a group size does not divide a layer's input features."""
    bad: dict[int, list[tuple[str, int]]] = {}
    for name, t in targeted.items():
        w = t.scheme.weights
        if w is None or w.strategy != QuantizationStrategy.GROUP or not w.group_size:
            continue
        in_features = model.get_submodule(name).in_features
        if in_features % w.group_size:
            bad.setdefault(w.group_size, []).append((name, in_features))
    if not bad:
        return
    problems = []
    for group_size, layers in bad.items():
        fits = [g for g in (128, 64, 32, 16) if g < group_size and all(n % g == 0 for _, n in layers)]
        fix = f"group_size: {fits[0]}" if fits else "a group size that divides them"
        shown = ", ".join(f"{name} ({n})" for name, n in layers[:4])
        more = f" and {len(layers) - 4} more" if len(layers) > 4 else ""
        problems.append(
            f"group_size {group_size} does not divide the input features of {len(layers)} layer(s): "
            f"{shown}{more}; use {fix}, or add them to ignore"
        )
    raise ModelPressError("; ".join(problems))
