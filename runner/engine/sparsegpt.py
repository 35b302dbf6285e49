"""SparseGPT (Frantar & Alistarh, 2023): prune a weight to a target sparsity, choosing and
compensating the pruned weights with the same inverse Hessian GPTQ uses.
"""

from dataclasses import dataclass

import torch

from modelpress.runner.engine.second_order import aligned_block_size, inverse_hessian, sweep


@dataclass
class SparseGPTResult:
    weight: torch.Tensor  # pruned and compensated, in the input's dtype
    keep: torch.Tensor  # bool [out, in]: the weights that survive
    row_loss: torch.Tensor  # per output row: sum(e^2) / 2 of the sweep
    dampening_frac: float


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
    keep = torch.ones_like(w, dtype=torch.bool)
    zeros_before = weight == 0 if keep_zeros else None
    cost_scale = torch.diag(inverse.upper).square()

    def step(w1: torch.Tensor, u1: torch.Tensor, i: int, col: int) -> torch.Tensor:
        if n == 0 and i == 0:
            cost = w1.square() / cost_scale[col : col + w1.shape[1]]
            prune = int(round(cost.numel() * sparsity))
            if prune:
                block = torch.ones_like(cost, dtype=torch.bool)
                block.view(-1)[cost.flatten().topk(prune, largest=False).indices] = False
                keep[:, col : col + w1.shape[1]] = block
        elif n and col % m == 0:
            cost = w1[:, i : i + m].square() / cost_scale[col : col + m]
            chosen = cost.topk(n, dim=1, largest=False).indices
            keep[:, col : col + m].scatter_(1, chosen, False)
        if zeros_before is not None:
            keep[:, col] &= ~zeros_before[:, col]
        return w1[:, i] * keep[:, col]

    row_loss = sweep(w, inverse.upper, aligned_block_size(block_size, m or 1), step)
    return SparseGPTResult(w.to(weight.dtype), keep, row_loss, inverse.dampening_frac)
