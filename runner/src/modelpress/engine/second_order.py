"""The core GPTQ and SparseGPT share: a damped inverse Hessian and the lazy-batch column sweep.

Both minimise the layer-wise error ||WX - QX||^2, whose Hessian is H = 2 X^T X / n. They fix one
column of W at a time (quantize it, or zero some of its entries) and move that column's error
onto the columns not yet fixed, through the upper Cholesky factor U of H^-1 (Frantar et al.).
The lazy-batch form updates a block of columns per step and the rest of the matrix once per
block, with one matrix product, so the per-column work touches only a [rows, block] slice.
"""

import logging
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Callable

import torch

from modelpress.engine.errors import ModelPressError

log = logging.getLogger(__name__)

MAX_DAMPENING = 10.0
# Threads a sweep whose output rows are independent runs on, each on its own rows. The column
# loop is a few small operations per column, each too small for torch's own threads: a second
# Python thread overlaps them (torch releases the GIL inside an operation). Rows are only split
# in parts of whole SIMD registers, so each element is computed as the one-thread sweep does.
SWEEP_THREADS = 2
ROW_ALIGN = 64

# step(block, i, col) -> the fixed value of row i of `block`: column `col` of W, as a row of W^T
ColumnStep = Callable[[torch.Tensor, int, int], torch.Tensor]


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
        # With J the column reversal, J H J = M M^T gives H = V V^T for the upper V = J M J, so
        # U = V^-1 is upper with U^T U = H^-1: one factorisation and one triangular inverse.
        lower, info = torch.linalg.cholesky_ex(damped.flip(0, 1))
        if info == 0:
            eye_matrix = torch.eye(h.shape[0], dtype=h.dtype, device=h.device)
            upper = torch.linalg.solve_triangular(lower.flip(0, 1), eye_matrix, upper=True)
            if frac != dampening_frac:
                log.warning("Hessian not positive definite: dampening raised from %g to %g", dampening_frac, frac)
            return InverseHessian(upper, dead, frac)
        frac *= 10
    raise ModelPressError(
        f"dampening_frac: the Hessian is not positive definite even with dampening {MAX_DAMPENING}; "
        "the calibration data may not exercise this layer (use more or longer samples, or ignore it)"
    )


def sweep(wt: torch.Tensor, upper: torch.Tensor, block_size: int, step: ColumnStep) -> torch.Tensor:
    """Fix the columns of W in place, in order; return each output row's error increase.

    `wt` is W^T [in, out], so that a column of W is one contiguous row. After `step` fixes column
    i to q, its change d = w_i - q moves onto the later columns as d * U[i, later] / U_ii; the
    term for column i itself is d, which sets it to q. A row's loss is sum((d / U_ii)^2) / 2.
    The loop is per column, so it is kept to a handful of vector operations.
    """
    cols, rows = wt.shape
    diag = torch.diagonal(upper)
    ratios = upper / diag[:, None]
    loss = torch.zeros(rows, dtype=torch.float32, device=wt.device)
    for i1 in range(0, cols, block_size):
        i2 = min(i1 + block_size, cols)
        block = wt[i1:i2]  # a view: updates land in wt
        r1 = ratios[i1:i2, i1:i2]
        changes = torch.empty(i2 - i1, rows, dtype=wt.dtype, device=wt.device)
        for i in range(i2 - i1):
            torch.sub(block[i], step(block, i, i1 + i), out=changes[i])
            block[i:].addr_(r1[i, i:], changes[i], alpha=-1)
        if i2 < cols:
            wt[i2:].addmm_(ratios[i1:i2, i2:].T, changes, alpha=-1)
        loss += (changes / diag[i1:i2, None]).square().sum(0) / 2
    return loss


def sweep_rows(wt: torch.Tensor, upper: torch.Tensor, block_size: int, step_for: Callable[[slice], ColumnStep]) -> torch.Tensor:
    """`sweep` of W^T's columns (W's output rows) in parts, each on a thread of its own, for a step
    that treats every output row alone (`step_for(rows)` is the step of those rows): the same
    result as one sweep, in place, with the same per-row losses."""
    rows = wt.shape[1]
    per = -(-rows // SWEEP_THREADS // ROW_ALIGN) * ROW_ALIGN
    spans = [slice(lo, min(lo + per, rows)) for lo in range(0, rows, per)]
    if len(spans) == 1:
        return sweep(wt, upper, block_size, step_for(spans[0]))

    def solve(span: slice) -> tuple[torch.Tensor, torch.Tensor]:
        part = wt[:, span].contiguous()
        return part, sweep(part, upper, block_size, step_for(span))

    with ThreadPoolExecutor(len(spans), thread_name_prefix="sweep") as pool:
        done = list(pool.map(solve, spans))
    for span, (part, _) in zip(spans, done):
        wt[:, span] = part
    return torch.cat([loss for _, loss in done])


def aligned_block_size(block_size: int, unit: int) -> int:
    """A block size that is a multiple of `unit`, so a quantization group or an N:M block never
    straddles two blocks (its columns must be current when it is decided)."""
    return max(block_size // unit, 1) * unit
