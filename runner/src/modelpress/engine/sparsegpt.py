"""SparseGPT (Frantar & Alistarh, 2023): prune a weight to a target sparsity, choosing and
compensating the pruned weights with the same inverse Hessian GPTQ uses.

`SparseGPTModifier` is the recipe's side: it plans the Linears to prune and hands the masks on to
a quantizer after it (GPTQ keeps them; every scheme maps 0 to 0). `sparsegpt` is the sweep.
"""

import re
from dataclasses import dataclass
from typing import ClassVar

import torch
from compressed_tensors.quantization import QuantizationScheme
from pydantic import Field, PrivateAttr, model_validator

from modelpress.engine.errors import ModelPressError
from modelpress.engine.modifier import LayerState, Modifier, Plan, frozen
from modelpress.engine.quantize import QuantizedLinear
from modelpress.engine.second_order import aligned_block_size, inverse_hessian, one_thread, sweep
from modelpress.engine.statistics import ActivationStats
from modelpress.engine.targets import TargetedModule, is_matched, unused_patterns


@dataclass
class SparseGPTResult:
    weight: torch.Tensor  # pruned and compensated, in the input's dtype
    keep: torch.Tensor  # bool [out, in]: the weights that survive
    row_loss: torch.Tensor  # per output row: sum(e^2) / 2 of the sweep
    dampening_frac: float


@one_thread()  # as gptq: small steps, each slowed by threads' joins
def sparsegpt(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    sparsity: float,
    n: int = 0,
    m: int = 0,
    block_size: int = 128,
    dampening_frac: float = 0.01,
    keep_zeros: bool = False,
) -> SparseGPTResult:
    """Zero `sparsity` of `weight`'s entries (unstructured), or `n` of every `m` consecutive
    inputs per row (N:M), and update the rest to keep the layer's output close.

    A weight's pruning cost is w^2 / U_jj^2. Unstructured masks are chosen per block of columns,
    on the weights as earlier blocks left them; N:M masks per group of m columns.
    """
    w = weight.float().clone()
    inverse = inverse_hessian(hessian, dampening_frac)
    w[:, inverse.dead] = 0
    # transposed, as the sweep works: column j of W is row j of W^T
    keep_t = torch.ones(w.shape[1], w.shape[0], dtype=torch.bool, device=w.device)
    zeros_t = (weight == 0).T if keep_zeros else None
    cost_scale = torch.diag(inverse.upper).square()[:, None]

    def step(block: torch.Tensor, i: int, col: int) -> torch.Tensor:
        if n == 0 and i == 0:
            cost = block.square() / cost_scale[col : col + block.shape[0]]
            prune = int(round(cost.numel() * sparsity))
            if prune:
                chosen = torch.ones_like(cost, dtype=torch.bool)
                chosen.view(-1)[cost.flatten().topk(prune, largest=False).indices] = False
                keep_t[col : col + block.shape[0]] = chosen
        elif n and col % m == 0:
            cost = block[i : i + m].square() / cost_scale[col : col + m]
            keep_t[col : col + m].scatter_(0, cost.topk(n, dim=0, largest=False).indices, False)
        if zeros_t is not None:
            keep_t[col] &= ~zeros_t[col]
        return block[i] * keep_t[col]

    wt = w.T.contiguous()
    row_loss = sweep(wt, inverse.upper, aligned_block_size(block_size, m or 1), step)
    return SparseGPTResult(wt.T.to(weight.dtype).contiguous(), keep_t.T.contiguous(), row_loss, inverse.dampening_frac)


class SparseGPTModifier(Modifier):
    """SparseGPT pruning: unstructured or N:M, weights stay dense with zeros.

    Followed by GPTQModifier or QuantizationModifier in the same recipe, the pruned weights stay
    zero: every scheme maps 0 to 0, and GPTQ is told the mask.
    """

    quantizes: ClassVar[bool] = False
    sparsity: float | None = Field(None, gt=0, lt=1)
    mask_structure: str = "0:0"
    block_size: int = Field(128, ge=1)
    dampening_frac: float = Field(0.01, gt=0)
    preserve_sparsity_mask: bool = False
    offload_hessians: bool = False
    targets: list[str] | str = ["Linear"]
    ignore: list[str] = []

    _nm: tuple[int, int] = PrivateAttr(default=(0, 0))  # parsed mask_structure; (0, 0): unstructured

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

    def plan(self, model: torch.nn.Module) -> Plan:
        targets = [self.targets] if isinstance(self.targets, str) else list(self.targets)
        missing = unused_patterns(model, targets)
        if missing:
            raise ModelPressError(f"SparseGPTModifier.targets: {missing} match no module in the model; check the names")
        empty = QuantizationScheme(targets=targets)
        targeted = {
            name: TargetedModule(name, "sparsity", empty)
            for name, module in model.named_modules()
            if isinstance(module, torch.nn.Linear) and is_matched(name, module, targets) and not is_matched(name, module, self.ignore)
        }
        if not targeted:
            raise ModelPressError(f"SparseGPTModifier: targets {targets} minus ignore {self.ignore} leave no Linear to prune")
        _, m = self._nm
        bad = [n for n in targeted if m and model.get_submodule(n).in_features % m]
        if bad:
            raise ModelPressError(f"SparseGPTModifier.mask_structure: {self.mask_structure} needs input features divisible by {m}; {bad[:4]} are not; add them to ignore")
        return Plan(frozen(targeted))

    def needs_hessians(self) -> bool:
        return True

    def needs_data(self) -> bool:
        return True

    def apply(
        self, plan: Plan, modules: dict[str, torch.nn.Linear], stats: dict[str, ActivationStats], state: LayerState
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
