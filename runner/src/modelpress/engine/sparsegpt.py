"""SparseGPT (Frantar & Alistarh, 2023): prune a weight to a target sparsity, choosing and
compensating the pruned weights with the same inverse Hessian GPTQ uses.
"""

from dataclasses import dataclass

import torch

from modelpress.engine.second_order import aligned_block_size, inverse_hessian, sweep


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
