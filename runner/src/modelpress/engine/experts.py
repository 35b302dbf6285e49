"""Mixture-of-experts MLPs as one Linear per expert, named as checkpoints name them.

transformers 5 keeps a MoE block's experts as two fused 3-D parameters (gate_up_proj [E, 2I, H],
gate rows first; down_proj [E, H, I]) and fuses the per-expert tensors of the checkpoint while
loading. Quantizers, smoothing and the checkpoint writer work on Linears, and vLLM reads one
Linear per expert (`experts.{e}.w1`, or `gate_proj` ...). So the engine swaps each fused experts
module for `ExpertLinears`, which computes the same function, and translates module names to the
checkpoint's (Mixtral's `mlp` block is `block_sparse_moe` on disk) when reading and writing.

While calibrating, every expert sees every token (its output only counts where the router sent
the token): an expert the calibration text rarely reaches would otherwise get a Hessian of a
handful of tokens, or none, and GPTQ would have nothing to fit it to.
"""

import re
from dataclasses import dataclass
from typing import Iterator

import torch
from transformers.conversion_mapping import get_checkpoint_conversion_mapping

from modelpress.engine.errors import ModelPressError


@dataclass(frozen=True)
class ExpertLayout:
    """How a model type stores experts on disk: each expert's Linear names, and block renames."""

    gate: str
    up: str
    down: str
    renames: tuple[tuple[str, str], ...] = ()  # (checkpoint fragment, module fragment), e.g. (".block_sparse_moe.", ".mlp.")


def expert_layout(model_type: str) -> ExpertLayout | None:
    """Read from transformers' own loading conversions: `.experts.*.w1.weight` + `.experts.*.w3.weight`
    fuse into `gate_up_proj`, `.experts.*.w2.weight` becomes `down_proj`."""
    names: dict[str, list[str]] = {}
    renames = []
    for rule in get_checkpoint_conversion_mapping(model_type) or []:
        sources, targets = list(rule.source_patterns), list(rule.target_patterns)
        if type(rule).__name__ == "WeightRenaming" and len(sources) == len(targets) == 1:
            renames.append((sources[0], targets[0]))
        elif len(targets) == 1 and targets[0].endswith(("experts.gate_up_proj", "experts.down_proj")):
            names[targets[0].rsplit(".", 1)[1]] = [re.sub(r"^.*experts\.\*\.(\w+)\.weight$", r"\1", s) for s in sources]
    gate_up, down = names.get("gate_up_proj", []), names.get("down_proj", [])
    if len(gate_up) != 2 or len(down) != 1 or not all(n.isidentifier() for n in gate_up + down):
        return None
    plain = all(re.fullmatch(r"[\w.]+", s) and re.fullmatch(r"[\w.]+", t) for s, t in renames)
    if not plain:
        return None  # renames that are real patterns cannot be turned around safely
    return ExpertLayout(gate_up[0], gate_up[1], down[0], tuple(renames))


def to_checkpoint_name(name: str, layout: ExpertLayout | None) -> str:
    """A module's full name as the checkpoint spells it."""
    for disk, module in layout.renames if layout else ():
        name = f".{name}".replace(module, disk)[1:]
    return name


def from_checkpoint_name(name: str, layout: ExpertLayout | None) -> str:
    for disk, module in layout.renames if layout else ():
        name = f".{name}".replace(disk, module)[1:]
    return name


class Expert(torch.nn.Module):
    """One expert's gated MLP; its Linears carry the checkpoint's names (set on the instance)."""

    def __init__(self, layout: ExpertLayout, act_fn: torch.nn.Module, gate: torch.nn.Linear, up: torch.nn.Linear, down: torch.nn.Linear) -> None:
        super().__init__()
        self.names = (layout.gate, layout.up, layout.down)
        for name, linear in zip(self.names, (gate, up, down)):
            self.add_module(name, linear)
        self.act_fn = act_fn

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up, down = (getattr(self, n) for n in self.names)
        return down(self.act_fn(gate(x)) * up(x))


class ExpertLinears(torch.nn.Module):
    """Drop-in for a fused experts module: forward(hidden [T, H], top_k_index [T, k], top_k_weights [T, k]).

    The experts are children named 0, 1, ... like a ModuleList's, but this is no ModuleList: the
    decoder layers are found as the longest list of identical blocks, and experts must not look like one.
    """

    def __init__(self, experts: list[Expert]) -> None:
        super().__init__()
        for e, expert in enumerate(experts):
            self.add_module(str(e), expert)
        self.route_all = False  # while calibrating: every expert runs on every token

    def __iter__(self) -> Iterator[Expert]:
        return iter(self.children())

    def __len__(self) -> int:
        return len(self._modules)

    def __getitem__(self, e: int) -> Expert:
        return self._modules[str(e)]

    def forward(self, hidden: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor) -> torch.Tensor:
        out = torch.zeros_like(hidden)
        for e, expert in enumerate(self):
            tokens, slot = torch.where(top_k_index == e)
            if self.route_all:
                y = expert(hidden)[tokens]
            elif tokens.numel():
                y = expert(hidden[tokens])
            else:
                continue
            out.index_add_(0, tokens, (y * top_k_weights[tokens, slot, None]).to(out.dtype))
        return out


def _is_fused_experts(module: torch.nn.Module) -> bool:
    params = dict(module.named_parameters(recurse=False))
    return (
        set(params) == {"gate_up_proj", "down_proj"}
        and params["gate_up_proj"].dim() == 3
        and params["down_proj"].dim() == 3
        and isinstance(getattr(module, "act_fn", None), torch.nn.Module)
    )


def unfuse_experts(model: torch.nn.Module, layout: ExpertLayout | None) -> int:
    """Swap every fused experts module for ExpertLinears (meta stays meta); returns how many."""
    fused = [(name, m) for name, m in model.named_modules() if _is_fused_experts(m)]
    if fused and layout is None:
        raise ModelPressError(
            f"model: {type(fused[0][1]).__name__} keeps its experts fused and the checkpoint layout of "
            f"{model.config.model_type} experts is unknown; this architecture cannot be compressed yet"
        )
    for name, module in fused:
        gate_up, down = module.gate_up_proj, module.down_proj
        n, two_i, h = gate_up.shape
        i = two_i // 2

        def linear(weight: torch.Tensor) -> torch.nn.Linear:
            lin = torch.nn.Linear(weight.shape[1], weight.shape[0], bias=False, device=weight.device, dtype=weight.dtype)
            if weight.device.type != "meta":
                lin.weight.data.copy_(weight)
            lin.weight.requires_grad_(False)
            return lin

        experts = [
            Expert(layout, module.act_fn, linear(gate_up[e, :i]), linear(gate_up[e, i:]), linear(down[e])) for e in range(n)
        ]
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, ExpertLinears(experts))
    return len(fused)


def route_all_tokens(model: torch.nn.Module, on: bool) -> None:
    for module in model.modules():
        if isinstance(module, ExpertLinears):
            module.route_all = on
