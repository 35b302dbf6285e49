"""The core GPTQ and SparseGPT share: a damped inverse Hessian and the lazy-batch column sweep.

Both minimise the layer-wise error ||WX - QX||^2, whose Hessian is H = 2 X^T X / n. They fix one
column of W at a time (quantize it, or zero some of its entries) and move that column's error
onto the columns not yet fixed, through the upper Cholesky factor U of H^-1 (Frantar et al.).
The lazy-batch form updates a block of columns per step and the rest of the matrix once per
block, with one matrix product, so the per-column work touches only a [rows, block] slice.
"""

import contextlib
import logging
from dataclasses import dataclass
from typing import Callable, Iterator

import torch

from modelpress.engine.errors import ModelPressError

log = logging.getLogger(__name__)

MAX_DAMPENING = 10.0
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


def group_aware_order(hessian: torch.Tensor, size: int) -> torch.Tensor:
    """Activation order that keeps each quantization group's columns together (GPTQModel's
    group-aware reordering, GAR): groups by their largest Hessian diagonal, descending, and the
    columns of a group by theirs. A group is then quantized in one stretch of the sweep, so its
    scale can be chosen when the sweep reaches it and stored as an ordinary static group scale.
    """
    diag = torch.diag(hessian).reshape(-1, size)
    within = torch.argsort(diag, dim=1, descending=True, stable=True)
    groups = torch.argsort(diag.amax(1), descending=True, stable=True)
    return (groups[:, None] * size + within[groups]).reshape(-1)


def inverse_hessian(hessian: torch.Tensor, dampening_frac: float, order: torch.Tensor | None = None) -> InverseHessian:
    """Damp H (its rows and columns taken in `order`, when given) and factor its inverse; raise
    the dampening tenfold until the factorisation holds.

    A dead column (zero diagonal) gets a unit diagonal so that H stays invertible; callers zero
    its weights, which the layer's output never depended on. Besides `hessian`, at most two
    [in, in] matrices are alive at once: a wide layer's Hessians are the largest tensors of its
    compression (8192 inputs: 256 MiB each).
    """
    n = hessian.shape[0]
    order = torch.arange(n, device=hessian.device) if order is None else order
    dead = torch.diag(hessian).float()[order] == 0
    diag = live_diagonal(hessian)[order]
    # With J the column reversal, J H J = M M^T gives H = V V^T for the upper V = J M J, so
    # U = V^-1 is upper with U^T U = H^-1: one factorisation and one triangular inverse.
    reverse = order.flip(0)
    # J H J, in `order`: one copy per try
    lower, frac = damped_cholesky(lambda: hessian[reverse[:, None], reverse].float(), diag.flip(0), diag.mean(), dampening_frac)
    upper_factor = lower.flip(0, 1)
    del lower
    # solved in place into the identity, laid out by columns as LAPACK works (and as a
    # solve into a new tensor returns it, so the result is the same to the bit)
    upper = torch.eye(n, dtype=upper_factor.dtype, device=upper_factor.device).T
    torch.linalg.solve_triangular(upper_factor, upper, upper=True, out=upper)
    if frac != dampening_frac:
        log.warning("Hessian not positive definite: dampening raised from %g to %g", dampening_frac, frac)
    return InverseHessian(upper, dead, frac)


def live_diagonal(hessian: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """H's diagonal with a dead column's (zero: no calibration token reached it) set to 1, the
    diagonal every damped form of H starts from."""
    diag = hessian.diagonal().to(dtype, copy=True)
    diag[diag == 0] = 1.0
    return diag


def damped_diagonal(live: torch.Tensor, mean: torch.Tensor, dampening_frac: float) -> torch.Tensor:
    """The diagonal GPTQ factors H with: the live diagonal plus `dampening_frac` x its mean."""
    return live + dampening_frac * mean


def damped_hessian(hessian: torch.Tensor, dampening_frac: float) -> torch.Tensor:
    """H as GPTQ factors it (inverse_hessian), in natural order."""
    damped = hessian.float().clone()
    live = live_diagonal(hessian)
    damped.diagonal().copy_(damped_diagonal(live, live.mean(), dampening_frac))
    return damped


def damped_cholesky(
    copy: Callable[[], torch.Tensor], diag: torch.Tensor, mean: torch.Tensor, dampening_frac: float
) -> tuple[torch.Tensor, float]:
    """The lower Cholesky factor of the matrix `copy()` makes, its diagonal replaced by the damped
    `diag` (live_diagonal, in the matrix's order; `mean` is its mean); frac starts at
    `dampening_frac` and is raised tenfold until the factorisation holds. Returns the factor and
    the fraction used."""
    frac = dampening_frac
    while frac <= MAX_DAMPENING:
        matrix = copy()
        matrix.diagonal().copy_(damped_diagonal(diag, mean, frac))
        lower, info = torch.linalg.cholesky_ex(matrix)
        del matrix
        if info == 0:
            return lower, frac
        del lower
        frac *= 10
    raise ModelPressError(
        f"dampening_frac: the Hessian is not positive definite even with dampening {MAX_DAMPENING}; "
        "the calibration data may not exercise this layer (use more or longer samples, or ignore it)"
    )


@contextlib.contextmanager
def one_thread() -> Iterator[None]:
    """Torch's intra-op threads off for a while, then back as they were.

    The sweep is thousands of small operations in a row; with more threads, each one big enough
    to be split pays a fork and a join, and where the cores are shared or rationed (a pod's CPU
    quota) the join waits for a thread the scheduler has put aside. Measured on 2 cores with
    other work running: a SmolLM2 gate/up sweep took 9.1 s with 2 threads and 0.06 s with one,
    with the same codes; on the idle machine one thread is as fast.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


@one_thread()
def sweep(wt: torch.Tensor, upper: torch.Tensor, block_size: int, step: ColumnStep) -> torch.Tensor:
    """Fix the columns of W in place, in order; return each output row's error increase.

    `wt` is W^T [in, out], so that a column of W is one contiguous row. After `step` fixes column
    i to q, its change d = w_i - q moves onto the later columns as d * U[i, later] / U_ii; the
    term for column i itself is d, which sets it to q. A row's loss is sum((d / U_ii)^2) / 2.
    The loop is per column, so it is kept to a handful of vector operations. `upper` is left as
    it was: the ratios are taken a block of its rows at a time, so one factorisation
    serves several sweeps (gptq.row_searched).
    """
    cols, rows = wt.shape
    diag = torch.diagonal(upper)
    loss = torch.zeros(rows, dtype=torch.float32, device=wt.device)
    for i1 in range(0, cols, block_size):
        i2 = min(i1 + block_size, cols)
        block = wt[i1:i2]  # a view: updates land in wt
        ratios = upper[i1:i2, i1:] / diag[i1:i2, None]  # this block's rows of U, each over its U_ii
        r1 = ratios[:, : i2 - i1]
        changes = torch.empty(i2 - i1, rows, dtype=wt.dtype, device=wt.device)
        for i in range(i2 - i1):
            torch.sub(block[i], step(block, i, i1 + i), out=changes[i])
            block[i:].addr_(r1[i, i:], changes[i], alpha=-1)
        if i2 < cols:
            wt[i2:].addmm_(ratios[:, i2 - i1 :].T, changes, alpha=-1)
        loss += (changes / diag[i1:i2, None]).square().sum(0) / 2
    return loss


def aligned_block_size(block_size: int, unit: int) -> int:
    """A block size that is a multiple of `unit`, so a quantization group or an N:M block never
    straddles two blocks (its columns must be current when it is decided)."""
    return max(block_size // unit, 1) * unit
