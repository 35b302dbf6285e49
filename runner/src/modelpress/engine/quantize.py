"""Round-to-nearest quantization math: ranges, scales, zero points, quantize and dequantize.

Conventions follow compressed-tensors so that its readers reproduce our weights bit for bit:
the observed range is widened to include 0, symmetric scales are absmax / ((qmax - qmin) / 2),
a zero scale becomes the dtype's epsilon, and dequantization is (q - zp) * scale in the scale's
dtype. Scales have shape [out, in/G] (group), [out, 1] (channel) or [1] (tensor).
"""

from dataclasses import dataclass
from typing import Callable, Literal, get_args

import torch
from compressed_tensors.quantization import (
    QuantizationArgs,
    QuantizationScheme,
    QuantizationStrategy,
    QuantizationType,
)

from modelpress.engine.errors import ModelPressError

FP8_MAX = 448.0  # largest finite float8_e4m3fn


@dataclass
class QParams:
    scale: torch.Tensor
    zero_point: torch.Tensor | None  # int8, same shape as scale; None when symmetric


def qrange(args: QuantizationArgs) -> tuple[float, float]:
    if args.type == QuantizationType.FLOAT:
        return -FP8_MAX, FP8_MAX
    return float(-(1 << (args.num_bits - 1))), float((1 << (args.num_bits - 1)) - 1)


def grouped(w: torch.Tensor, args: QuantizationArgs) -> torch.Tensor:
    """View a weight as [rows, groups, group_size] so that every strategy is one reduction."""
    if args.strategy == QuantizationStrategy.GROUP:
        return w.reshape(w.shape[0], -1, args.group_size)
    if args.strategy == QuantizationStrategy.CHANNEL:
        return w.reshape(w.shape[0], 1, -1)
    return w.reshape(1, 1, -1)


def qparams_from_range(
    xmin: torch.Tensor, xmax: torch.Tensor, args: QuantizationArgs, dtype: torch.dtype
) -> QParams:
    """Scale (and zero point) covering [xmin, xmax] widened to include 0."""
    qmin, qmax = qrange(args)
    xmin = xmin.float().clamp(max=0)
    xmax = xmax.float().clamp(min=0)
    if args.symmetric:
        scale = torch.maximum(-xmin, xmax) / ((qmax - qmin) / 2)
    else:
        scale = (xmax - xmin) / (qmax - qmin)
    scale = scale.to(dtype)
    scale = torch.where(scale == 0, torch.finfo(dtype).eps, scale)
    zero_point = None
    if not args.symmetric:
        zero_point = torch.round(qmin - xmin / scale.float()).clamp(qmin, qmax).to(torch.int8)
    return QParams(scale, zero_point)


@dataclass(frozen=True)
class RangeSearch:
    """A clipping search: the shrink factors tried, the error's exponent, and when to stop.

    The factors are 1, 1 - 1/grid, ... as llm-compressor 0.14 steps them; the search stops once
    `patience` factors in a row improved no group of the tensor (0: never stops early).
    `separate_ends` (ModelPress's own, asymmetric only) then refines each end of every group's
    range on its own: a group with an outlier on one side need not clip the other side as much.
    """

    shrinks: tuple[float, ...]
    norm: float
    patience: int
    separate_ends: bool = False


def _search(kw: dict, shrinks: tuple[float, ...], norm: float) -> RangeSearch:
    return RangeSearch(shrinks, float(kw.get("norm", norm)), int(kw.get("patience", 5)), bool(kw.get("separate_ends", False)))


def mse_search(args: QuantizationArgs) -> RangeSearch:
    """llm-compressor's `mse` observer: int(maxshrink * grid) factors from 1, error |e|^2.4."""
    kw = args.observer_kwargs or {}
    grid, maxshrink = float(kw.get("grid", 100.0)), float(kw.get("maxshrink", 0.20))
    steps = int(maxshrink * grid)
    return _search(kw, tuple(1 - i / grid for i in range(steps)), 2.4)


def imatrix_search(args: QuantizationArgs) -> RangeSearch:
    """llm-compressor's `imatrix_mse` observer: a coarse grid down to 5% of the range, error |e|^3."""
    kw = args.observer_kwargs or {}
    grid, maxshrink = float(kw.get("grid", 20)), float(kw.get("maxshrink", 0.95))
    steps = max(1, int(maxshrink * grid))
    return _search(kw, tuple(1 - i / grid for i in range(steps + 1)), 3.0)


SEARCH_ELEMENTS = 1 << 24  # candidates x weights evaluated at once; bounds the search's memory


def searched_qparams(
    w: torch.Tensor,
    args: QuantizationArgs,
    dtype: torch.dtype,
    search: RangeSearch,
    importance: torch.Tensor | None = None,
) -> QParams:
    """Per group, the shrunk range whose codes have the least sum of importance * |error|^norm.

    Clipping a few outliers buys finer steps for the rest of the group. `importance` weighs each
    input column (E[x^2] of the Linear's inputs: an error on a column that is seldom activated
    costs the output little); None weighs all alike. Every factor and every group is evaluated in
    one batch of tensor operations (rows are cut into chunks only to bound memory), and the
    stopping rule is applied afterwards to the whole table of errors.
    """
    g = grouped(w, args).float()
    xmin, xmax = g.amin(-1), g.amax(-1)
    shrinks = torch.tensor(search.shrinks, dtype=torch.float32, device=w.device).reshape(-1, 1, 1)
    weights = None
    if importance is not None:
        imp = importance.float().to(w.device)
        imp = imp / (imp.mean() + torch.finfo(torch.float32).tiny)
        weights = grouped(imp.expand_as(w), args)

    def errors(low: torch.Tensor, high: torch.Tensor) -> torch.Tensor:
        """[candidates, rows, groups]: each group's error with the range [low * xmin, high * xmax];
        `low` and `high` are the grid ([K, 1, 1]) or one factor per group ([1, rows, groups])."""
        table = torch.empty(max(len(low), len(high)), *xmin.shape, device=w.device)
        chunk = max(1, SEARCH_ELEMENTS // max(1, len(table) * g.shape[1] * g.shape[2]))
        for r in range(0, g.shape[0], chunk):
            rows = slice(r, r + chunk)
            lo, hi = (f if f.shape[1] == 1 else f[:, rows] for f in (low, high))
            candidate = qparams_from_range(lo * xmin[rows], hi * xmax[rows], args, dtype)
            err = (_fake_grouped(g[rows], candidate, args) - g[rows]).abs_().pow_(search.norm)
            if weights is not None:
                err.mul_(weights[rows])
            table[:, rows] = err.sum(-1)
        return table

    def pick(table: torch.Tensor) -> torch.Tensor:  # the first of equal errors, as a strict < keeps it
        return torch.gather(shrinks.expand(-1, *xmin.shape), 0, table.argmin(0, keepdim=True))

    joint = errors(shrinks, shrinks)
    low = high = pick(joint[: _searched_prefix(joint, search.patience)])
    if search.separate_ends and not args.symmetric:  # each pass keeps the factor it starts from among its candidates
        low = pick(errors(shrinks, high))
        high = pick(errors(low, shrinks))
    return _shaped(qparams_from_range(low[0] * xmin, high[0] * xmax, args, dtype), args)


def _searched_prefix(errors: torch.Tensor, patience: int) -> int:
    """How many factors a sequential search with this patience would have tried."""
    before = torch.cummin(errors, 0).values
    before = torch.cat([torch.full_like(before[:1], float("inf")), before[:-1]])
    improved = (errors < before).flatten(1).any(1).tolist()
    idle = 0
    for i, better in enumerate(improved):
        idle = 0 if better else idle + 1
        if patience > 0 and idle >= patience:
            return i + 1
    return len(improved)


def mse_qparams(w: torch.Tensor, args: QuantizationArgs, dtype: torch.dtype, importance: torch.Tensor | None = None) -> QParams:
    """The `mse` observer: clipping chosen by unweighted error (`importance` is not read)."""
    return searched_qparams(w, args, dtype, mse_search(args))


def imatrix_mse_qparams(
    w: torch.Tensor, args: QuantizationArgs, dtype: torch.dtype, importance: torch.Tensor | None = None
) -> QParams:
    """The `imatrix_mse` observer: clipping chosen by the error weighted by E[x^2] per input column."""
    if importance is None:
        raise ModelPressError("weight_observer imatrix_mse: needs calibration data (E[x^2] of each Linear's inputs); pass a dataset")
    return searched_qparams(w, args, dtype, imatrix_search(args), importance)


def minmax_qparams(w: torch.Tensor, args: QuantizationArgs, dtype: torch.dtype, importance: torch.Tensor | None = None) -> QParams:
    """The `minmax` observer: each group's own range (`importance` is not read)."""
    g = grouped(w, args)
    return _shaped(qparams_from_range(g.amin(-1), g.amax(-1), args, dtype), args)


Observer = Callable[[torch.Tensor, QuantizationArgs, torch.dtype, torch.Tensor | None], QParams]
OBSERVERS: dict[str, Observer] = {"minmax": minmax_qparams, "mse": mse_qparams, "imatrix_mse": imatrix_mse_qparams}
# llm-compressor's observer names (a weight is observed once: memoryless and moving-average agree)
ObserverName = Literal["minmax", "mse", "imatrix_mse", "memoryless_minmax", "memoryless_mse", "static_minmax"]
OBSERVER_NAMES: tuple[str, ...] = get_args(ObserverName)


def weight_observer(name: str | None) -> Observer:
    """An observer name (the modifier's `weight_observer` or a scheme's `observer`) to its function."""
    name = name or "minmax"
    if name not in OBSERVER_NAMES:
        raise ModelPressError(f"weight_observer: {name!r} is unknown; choose one of {', '.join(OBSERVER_NAMES)}")
    return OBSERVERS[name.removeprefix("memoryless_").removeprefix("static_")]


def needs_importance(name: str | None) -> bool:
    return name == "imatrix_mse"


def quantize(w: torch.Tensor, qp: QParams, args: QuantizationArgs) -> torch.Tensor:
    """Integer codes as int8, or FP8 values as float8_e4m3fn, with the weight's shape.

    One float32 temporary of the weight's size, worked on in place: the widest Linear of a large
    model is hundreds of MiB in float32.
    """
    g = torch.div(grouped(w, args), _expand(qp.scale, args).float())  # promoted to float32
    if qp.zero_point is not None:
        g.add_(_expand(qp.zero_point, args).float())
    qmin, qmax = qrange(args)
    if args.type == QuantizationType.FLOAT:
        return g.clamp_(qmin, qmax).to(torch.float8_e4m3fn).reshape(w.shape)
    return g.round_().clamp_(qmin, qmax).to(torch.int8).reshape(w.shape)


def dequantize(q: torch.Tensor, qp: QParams, args: QuantizationArgs) -> torch.Tensor:
    """(q - zp) * scale in the scale's dtype: exactly what compressed-tensors' readers compute."""
    dtype = qp.scale.dtype
    g = grouped(q, args).to(dtype, copy=True)
    if qp.zero_point is not None:
        g.sub_(_expand(qp.zero_point, args).to(dtype))
    return g.mul_(_expand(qp.scale, args)).reshape(q.shape)


def _expand(t: torch.Tensor, args: QuantizationArgs) -> torch.Tensor:
    """Stored [out, groups] / [out, 1] / [1] parameters as [rows, groups, 1] for broadcasting."""
    if args.strategy == QuantizationStrategy.TENSOR:
        return t.reshape(1, 1, 1)
    return t.unsqueeze(-1)


def _shaped(qp: QParams, args: QuantizationArgs) -> QParams:
    """Observers reduce to [rows, groups]; per-tensor parameters are stored with shape [1]."""
    if args.strategy != QuantizationStrategy.TENSOR:
        return qp
    zp = qp.zero_point.reshape(1) if qp.zero_point is not None else None
    return QParams(qp.scale.reshape(1), zp)


def _fake_grouped(g: torch.Tensor, qp: QParams, args: QuantizationArgs) -> torch.Tensor:
    scale = qp.scale.float().unsqueeze(-1)
    x = g / scale
    if qp.zero_point is not None:
        x = x + qp.zero_point.float().unsqueeze(-1)
    qmin, qmax = qrange(args)
    x = x.clamp(qmin, qmax)
    x = x.to(torch.float8_e4m3fn).float() if args.type == QuantizationType.FLOAT else x.round()
    if qp.zero_point is not None:
        x = x - qp.zero_point.float().unsqueeze(-1)
    return x * scale


@dataclass
class QuantizedLinear:
    """What the checkpoint needs of one quantized Linear: codes, their parameters, and the scheme."""

    scheme: QuantizationScheme
    q: torch.Tensor
    qparams: QParams
    input_qparams: QParams | None = None  # static activation scale, observed on calibration data
