"""The core GPTQ and SparseGPT share: a damped inverse Hessian and the lazy-batch column sweep.

Both minimise the layer-wise error ||WX - QX||^2, whose Hessian is H = 2 X^T X / n. They fix one
column of W at a time (quantize it, or zero some of its entries) and move that column's error
onto the columns not yet fixed, through the upper Cholesky factor U of H^-1 (Frantar et al.).
The lazy-batch form updates a block of columns per step and the rest of the matrix once per
block, with one matrix product, so the per-column work touches only a [rows, block] slice.
"""

import logging
from dataclasses import dataclass
from typing import Callable

import torch

from modelpress.runner.engine.errors import ModelPressError

log = logging.getLogger(__name__)

MAX_DAMPENING = 10.0

# step(W1, U1, i, col) -> the fixed value of column i of the live block W1 (column `col` of W)
ColumnStep = Callable[[torch.Tensor, torch.Tensor, int, int], torch.Tensor]


@dataclass
class InverseHessian:
    upper: torch.Tensor  # U with U^T U = (H + damp * mean(diag H) * I)^-1
    dead: torch.Tensor  # bool per column: no calibration token ever activated it
    dampening_frac: float  # the fraction finally used (raised when the factorisation failed)


def activation_order(hessian: torch.Tensor) -> torch.Tensor:
    """Columns by descending Hessian diagonal: the most activated ones are fixed first."""
    return torch.argsort(torch.diag(hessian), descending=True, stable=True)


def inverse_hessian(hessian: torch.Tensor, dampening_frac: float) -> InverseHessian:
    """Damp H and factor its inverse; raise the dampening tenfold until the factorisation holds.

    A dead column (zero diagonal) gets a unit diagonal so that H stays invertible; callers zero
    its weights, which the layer's output never depended on.
    """
    h = hessian.float().clone()
    diag = torch.diag(h)
    dead = diag == 0
    h[dead, dead] = 1.0
    mean = torch.diag(h).mean()
    eye = torch.arange(h.shape[0], device=h.device)
    frac = dampening_frac
    while frac <= MAX_DAMPENING:
        damped = h.clone()
        damped[eye, eye] += frac * mean
        lower, info = torch.linalg.cholesky_ex(damped)
        if info == 0:
            # cholesky_solve, not cholesky_inverse: the latter is ~100x slower on CPU builds
            inverse = torch.cholesky_solve(torch.eye(h.shape[0], dtype=h.dtype, device=h.device), lower)
            upper, info = torch.linalg.cholesky_ex(inverse, upper=True)
            if info == 0:
                if frac != dampening_frac:
                    log.warning("Hessian not positive definite: dampening raised from %g to %g", dampening_frac, frac)
                return InverseHessian(upper, dead, frac)
        frac *= 10
    raise ModelPressError(
        f"dampening_frac: the Hessian is not positive definite even with dampening {MAX_DAMPENING}; "
        "the calibration data may not exercise this layer (use more or longer samples, or ignore it)"
    )


def sweep(w: torch.Tensor, upper: torch.Tensor, block_size: int, step: ColumnStep) -> torch.Tensor:
    """Fix the columns of `w` in place, left to right; return each row's output-error increase.

    After `step` fixes column i to q, the error e = (w_i - q) / U_ii is subtracted from the later
    columns as e * U[i, later]. A row's loss is sum(e^2) / 2, the increase of its layer-wise error.
    """
    rows, cols = w.shape
    loss = torch.zeros(rows, dtype=torch.float32, device=w.device)
    for i1 in range(0, cols, block_size):
        i2 = min(i1 + block_size, cols)
        w1 = w[:, i1:i2]  # a view: updates land in w
        u1 = upper[i1:i2, i1:i2]
        errors = torch.empty(rows, i2 - i1, dtype=w.dtype, device=w.device)
        for i in range(i2 - i1):
            q = step(w1, u1, i, i1 + i)
            err = (w1[:, i] - q).div_(u1[i, i])
            w1[:, i:].addr_(err, u1[i, i:], alpha=-1)
            w1[:, i] = q
            errors[:, i] = err
        loss += errors.square().sum(1) / 2
        if i2 < cols:
            w[:, i2:].addmm_(errors, upper[i1:i2, i2:], alpha=-1)
    return loss


def aligned_block_size(block_size: int, unit: int) -> int:
    """A block size that is a multiple of `unit`, so a quantization group or an N:M block never
    straddles two blocks (its columns must be current when it is decided)."""
    return max(block_size // unit, 1) * unit
