"""The statistics data-driven algorithms read from a Linear's calibration inputs.

Gathered per Linear by a forward pre-hook while a decoder layer runs over the calibration set
(or per group of Linears from their shared input, on the sequential path): token count, input
range, per-channel input maxima (SmoothQuant, AWQ) and, when asked, X^T X, from which GPTQ and
SparseGPT take their Hessian and AWQ its output error; and, for GPTQ aimed at the float model,
(X_float - X)^T X, how far the float model's inputs to the same Linears lie from these.
"""

from dataclasses import dataclass, field
from typing import Callable, Iterator

import torch


@dataclass
class ActivationStats:
    """Running statistics of one Linear's inputs over the calibration set."""

    tokens: int = 0
    xmin: torch.Tensor | None = None
    xmax: torch.Tensor | None = None
    channel_absmax: torch.Tensor | None = None
    xtx: torch.Tensor | None = field(default=None, repr=False)
    made_hessian: bool = field(default=False, repr=False)  # `xtx` holds H = 2 X^T X / n now (see `hessian`)
    cross: torch.Tensor | None = field(default=None, repr=False)  # sum of (x_float - x)^T x, [in, in]

    def update(self, x: torch.Tensor, with_hessian: bool, with_ranges: bool = True) -> None:
        if self.made_hessian:
            raise RuntimeError("statistics updated after their Hessian was taken")
        x = x.reshape(-1, x.shape[-1]).float()
        self.tokens += x.shape[0]
        if with_ranges:
            # per-channel extremes first: two passes over x instead of one per statistic
            low, high = x.amin(0), x.amax(0)
            amin, amax, cmax = low.min(), high.max(), torch.maximum(high, -low)
            if self.xmin is None:
                self.xmin, self.xmax, self.channel_absmax = amin, amax, cmax
            else:
                self.xmin = torch.minimum(self.xmin, amin)
                self.xmax = torch.maximum(self.xmax, amax)
                self.channel_absmax = torch.maximum(self.channel_absmax, cmax)
        if with_hessian:
            if self.xtx is None:
                self.xtx = x.new_zeros(x.shape[1], x.shape[1])
            add_upper_gram(self.xtx, x)

    def update_drift(self, x: torch.Tensor, x_float: torch.Tensor) -> None:
        """Add (x_float - x)^T x of tokens `update` has counted (or will): the same rows of both models."""
        if x.shape != x_float.shape:
            raise RuntimeError(f"float inputs {tuple(x_float.shape)} do not match the inputs {tuple(x.shape)}")
        x = x.reshape(-1, x.shape[-1]).float()
        d = x_float.reshape(x.shape).float() - x
        if self.cross is None:
            self.cross = x.new_zeros(x.shape[1], x.shape[1])
        self.cross.addmm_(d.T, x)

    @property
    def drift(self) -> torch.Tensor:
        """2 (X_float - X)^T X / n: the cross term in the Hessian's scale (see gptq.float_target)."""
        if self.cross is None:
            raise RuntimeError("the float model's inputs were not collected for this module")
        return self.cross * (2.0 / self.tokens)

    @property
    def gram(self) -> torch.Tensor:
        """X^T X with both triangles: `update` fills only the blocks on and above the diagonal."""
        if self.xtx is None:
            raise RuntimeError("X^T X was not collected for this module")
        if self.made_hessian:
            return self.xtx * (self.tokens / 2.0)
        full = torch.triu(self.xtx)
        below = torch.triu(full, 1)
        full += below.T
        return full

    @property
    def mean_square(self) -> torch.Tensor:
        """E[x^2] per input channel over the calibration tokens: the diagonal of X^T X / n, the
        importance the `imatrix_mse` observer weighs each input column's error by."""
        if self.xtx is None:
            raise RuntimeError("X^T X was not collected for this module")
        if self.made_hessian:  # xtx holds H = 2 X^T X / n
            return torch.diagonal(self.xtx) / 2.0
        return torch.diagonal(self.xtx) / self.tokens

    @property
    def hessian(self) -> torch.Tensor:
        """H = 2 X^T X / n, the curvature of the layer-wise squared error (GPTQ, SparseGPT).

        Made once, in X^T X's own storage: the statistics are complete when it is asked for, and
        a wide layer's matrix is the largest tensor of its compression (8192 inputs: 256 MiB).
        """
        if self.xtx is None:
            raise RuntimeError("X^T X was not collected for this module")
        if not self.made_hessian:
            self.xtx.triu_()
            below = torch.triu(self.xtx, 1)
            self.xtx += below.T
            del below
            self.xtx.mul_(2.0 / self.tokens)
            self.made_hessian = True
        return self.xtx


GRAM_BLOCK = 96  # widest diagonal block taken as one full product


def add_upper_gram(acc: torch.Tensor, x: torch.Tensor) -> None:
    """acc += X^T X on and above the diagonal only: X^T X is symmetric, so half of it is skipped
    and `gram` mirrors it once at the end.

    The columns split in two halves: one product for the block above the diagonal, then each
    diagonal block the same way. This beats one full product, and fixed-width strips too,
    because every product stays large and square (figures in bench/measurements.md).
    """
    d = x.shape[1]
    if d <= GRAM_BLOCK:
        acc.addmm_(x.T, x)
        return
    mid = d // 2
    acc[:mid, mid:].addmm_(x[:, :mid].T, x[:, mid:])
    add_upper_gram(acc[:mid, :mid], x[:, :mid])
    add_upper_gram(acc[mid:, mid:], x[:, mid:])


class StatsCollector:
    """Hooks that record ActivationStats for a set of Linears while the caller runs forwards."""

    def __init__(self, modules: dict[str, torch.nn.Module], hessians: bool = False, ranges: bool = True) -> None:
        self.modules = modules
        self.hessians = hessians
        self.ranges = ranges
        self.stats: dict[str, ActivationStats] = {name: ActivationStats() for name in modules}
        self._handles: list[torch.utils.hooks.RemovableHandle] = []

    def __enter__(self) -> "StatsCollector":
        for name, module in self.modules.items():
            self._handles.append(module.register_forward_pre_hook(self._hook(name)))
        return self

    def __exit__(self, *exc: object) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def _hook(self, name: str) -> Callable[[torch.nn.Module, tuple], None]:
        def record(_module: torch.nn.Module, args: tuple) -> None:
            self.stats[name].update(args[0].detach(), self.hessians, self.ranges)

        return record


def group_stats(
    rows: Callable[[], Iterator[torch.Tensor]],
    with_hessian: bool,
    with_ranges: bool,
    float_rows: Callable[[], Iterator[torch.Tensor]] | None = None,
) -> ActivationStats:
    """Statistics of one group's input: X^T X as a few large products over all tokens; with
    `float_rows` (the float model's input to the same group, in pieces of the same sizes) the
    cross term too."""
    stats = ActivationStats()
    floats = float_rows() if float_rows is not None else None
    for chunk in rows():
        stats.update(chunk, with_hessian, with_ranges)
        if floats is not None:
            stats.update_drift(chunk, next(floats))
    return stats
