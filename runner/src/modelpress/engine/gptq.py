"""GPTQ (Frantar et al., 2022): quantize a weight column by column, compensating each column's
rounding error on the columns not yet quantized, so the layer's output moves as little as possible.

`GPTQModifier` is the recipe's side: it stacks the Linears that share a Hessian, keeps the mask of
a SparseGPT run before it, and calls `gptq`, the sweep, per stack. The damped inverse Hessian and
the lazy-batch column loop it shares with SparseGPT are in second_order.py. With `float_target`,
each stack is first moved to `float_target`'s weight, which aims it at the float model's output.
With 4-bit per-channel scales, each row's clipping is chosen by GPTQ's own error: the sweep runs
once per candidate range, and every row keeps its best run (`row_searched`). After the sweep, each
row's scales are refitted to the codes it chose (`refitted`, by least squares under the same
Hessian): the codes and the format stay, the error only falls.
"""

from dataclasses import dataclass
from typing import Any, Callable, Literal

import torch
from compressed_tensors.quantization import QuantizationArgs, QuantizationStrategy, QuantizationType
from pydantic import Field, field_validator, model_validator

from modelpress.engine.errors import ModelPressError
from modelpress.engine.layer_pass import find_parts
from modelpress.engine.modifier import LayerState, Plan, Planned
from modelpress.engine.quantize import (Observer, QParams, QuantizedLinear, dequantize, grouped, minmax_qparams, qparams_from_range, qrange,
                                       weight_observer)
from modelpress.engine.rtn import QuantizationModifier, importance, input_qparams
from modelpress.engine.smoothing import SmoothingModifier
from modelpress.engine.second_order import (InverseHessian, activation_order, aligned_block_size, damped_cholesky, damped_hessian,
                                            group_aware_order, inverse_hessian, live_diagonal, one_thread, sweep)
from modelpress.engine.statistics import ActivationStats
from modelpress.engine.weights import find_decoder_layers

Order = Literal["static", "group_aware"] | None
CLIP_SEARCH = (0.95, 0.9, 0.85, 0.8, 0.75, 0.7)  # GPTQModifier.clip_search's default for 4-bit per-channel scales


@dataclass
class GPTQResult:
    q: torch.Tensor  # codes in natural column order, as quantize() returns them
    qparams: QParams
    row_loss: torch.Tensor  # per output row: sum(e^2) / 2 of the sweep
    dampening_frac: float


def sweep_order(hessian: torch.Tensor, args: QuantizationArgs, actorder: Order) -> torch.Tensor:
    """The order GPTQ visits the columns in: natural, by Hessian diagonal, or group-aware."""
    cols = hessian.shape[0]
    if actorder is None:
        return torch.arange(cols, device=hessian.device)
    if actorder == "group_aware" and args.strategy == QuantizationStrategy.GROUP:
        return group_aware_order(hessian, args.group_size)
    return activation_order(hessian)


def gptq(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    args: QuantizationArgs,
    block_size: int = 128,
    dampening_frac: float = 0.01,
    actorder: Order = "static",
    observer: Observer = minmax_qparams,
    keep: torch.Tensor | None = None,
    importance: torch.Tensor | None = None,
    scales: QParams | None = None,
    inverse: InverseHessian | None = None,
) -> GPTQResult:
    """Quantize `weight` [out, in] given the Hessian [in, in] of its layer-wise error.

    With `actorder` "static", columns are visited by descending Hessian diagonal (stored in
    natural order, so it costs nothing at inference), and the scales are observed up front on
    the whole weight: a group's columns are scattered over the sweep. Without it, and with
    "group_aware" (whose groups are visited whole, most important first), a group's scale is
    observed when the sweep reaches the group, on the weights as the earlier columns' errors
    left them. `importance` (E[x^2] per input column) is handed to the observer.
    `keep` (bool, [out, in]) forces the other weights to zero: a sparsity mask survives.
    `scales`, when given, are used as they are instead of observed (as static ones are).
    `inverse`, when given, is the damped inverse factored for `hessian` in this `actorder`.
    """
    rows, cols = weight.shape
    dtype = weight.dtype
    group = args.strategy == QuantizationStrategy.GROUP
    size = args.group_size if group else cols

    order = sweep_order(hessian, args, actorder)
    if inverse is None:
        inverse = inverse_hessian(hessian, dampening_frac, order)
    # the rest is many small steps, which lose far more to threads' joins than they gain (one_thread);
    # the inverse before it is a few large factorisations, which gain
    with one_thread():
        # W^T in sweep order: a column of W is a contiguous row (see sweep); the only float copy of W
        wt = torch.index_select(weight.T, 0, order).float()
        wt[inverse.dead] = 0
        keep_t = torch.index_select(keep.T, 0, order) if keep is not None else None
        if keep_t is not None:
            wt *= keep_t
        natural = torch.argsort(order)

        # a column's scale and zero point are its group's: rows of [groups, rows] tables, never
        # spread to the weight's size
        static = not group or actorder == "static" or scales is not None
        groups = cols // size if group else 1
        column_group = (order // size).tolist() if group else [0] * cols
        if static:
            qp = scales if scales is not None else observer(wt[natural].T, args, dtype, importance)
            scale_g, zero_g = _per_group(qp, rows)
        else:
            scale_g = torch.empty(groups, rows, dtype=torch.float32, device=weight.device)
            zero_g = torch.zeros(groups, rows, dtype=torch.float32, device=weight.device)
            group_scales, group_zeros = [], []
            importance_t = importance[order] if importance is not None else None
        to_codes = _coder(args)

        def step(block: torch.Tensor, i: int, col: int) -> torch.Tensor:
            g = column_group[col]
            if not static and col % size == 0:
                part = importance_t[col : col + size] if importance_t is not None else None
                gqp = observer(block[i : i + size].T, args, dtype, part)
                group_scales.append(gqp.scale)
                group_zeros.append(gqp.zero_point)
                scale_g[g] = gqp.scale.float().reshape(rows)
                if gqp.zero_point is not None:
                    zero_g[g] = gqp.zero_point.float().reshape(rows)
            x = block[i] if keep_t is None else block[i] * keep_t[col]
            s, z = scale_g[g], zero_g[g]
            return to_codes(x, s, z).sub_(z).mul_(s)

        row_loss = sweep(wt, inverse.upper, aligned_block_size(block_size, size if group else 1), step)
        # the swept weights are the dequantized codes up to rounding far below a code step; coded in
        # natural column order, in place, each group against its own row of the tables
        w = wt[natural]
        del wt
        by_group = w.view(groups, -1, rows)
        to_codes(by_group, scale_g[:, None], zero_g[:, None], by_group)
        codes = w.T.to(torch.float8_e4m3fn if args.type == QuantizationType.FLOAT else torch.int8).contiguous()
        if not static:
            visited = torch.argsort(order[::size] // size)  # the groups were observed in sweep order
            zp = torch.cat(group_zeros, dim=1)[:, visited] if group_zeros[0] is not None else None
            qp = QParams(torch.cat(group_scales, dim=1)[:, visited], zp)
        return GPTQResult(codes, qp, row_loss, inverse.dampening_frac)


def row_searched(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    args: QuantizationArgs,
    shrinks: tuple[float, ...],
    actorder: Order = "static",
    dampening_frac: float = 0.01,
    **options: Any,
) -> GPTQResult:
    """GPTQ with the observer's scales, then once more per factor in `shrinks` with each group's
    min-max range shrunk by it; every row keeps the run whose sweep left it the least error.

    A column's rounding error moves only along its own row, so a GPTQ run's rows are independent
    and the rows picked from several runs make up a GPTQ run of their own. The clip is then chosen
    on the error GPTQ minimises, after its compensation, where an observer only sees the rounding
    error before it. Per-tensor scales (one for every row) are left as observed. `options` are
    gptq()'s.
    """
    if args.strategy == QuantizationStrategy.TENSOR or not shrinks:
        return gptq(weight, hessian, args, actorder=actorder, dampening_frac=dampening_frac, **options)
    inverse = inverse_hessian(hessian, dampening_frac, sweep_order(hessian, args, actorder))  # one factorisation for every run
    options = {**options, "actorder": actorder, "inverse": inverse}
    best = gptq(weight, hessian, args, **options)
    live = weight.float() * (torch.diagonal(hessian) != 0)  # gptq() zeroes a dead column before it observes
    if options.get("keep") is not None:
        live *= options["keep"]
    groups = grouped(live, args)
    low, high = groups.amin(-1), groups.amax(-1)  # [rows, groups]: no weight-sized copy outlives this line
    del live, groups
    for factor in shrinks:
        run = gptq(weight, hessian, args, **{**options, "scales": qparams_from_range(factor * low, factor * high, args, weight.dtype)})
        better = run.row_loss < best.row_loss
        per_row = better[:, None]
        zero_point = None if best.qparams.zero_point is None else torch.where(per_row, run.qparams.zero_point, best.qparams.zero_point)
        best = GPTQResult(
            torch.where(per_row, run.q, best.q),
            QParams(torch.where(per_row, run.qparams.scale, best.qparams.scale), zero_point),
            torch.where(better, run.row_loss, best.row_loss),
            best.dampening_frac,
        )
    return best


def refitted(
    weight: torch.Tensor, hessian: torch.Tensor, args: QuantizationArgs, rounds: int, shrinks: tuple[float, ...] = (), **options: Any
) -> GPTQResult:
    """GPTQ (with each row's clip searched over `shrinks`, row_searched) alternated with
    least-squares scales, `rounds` times: the sweep chooses codes for the scales, then each row's
    scales are refitted to those codes (`least_squares_scales`); a later round sweeps again
    against the refitted scales. Both steps lower the same layer-wise error, so each round ends no
    worse than the one before. Per-tensor scales (one for every row) are left as observed.
    `options` are gptq()'s."""
    result = row_searched(weight, hessian, args, shrinks, **options)
    if args.strategy == QuantizationStrategy.TENSOR:
        return result
    for round_ in range(rounds):
        if round_:
            result = gptq(weight, hessian, args, **{**options, "scales": result.qparams})
        damped = damped_hessian(hessian, result.dampening_frac)
        scale, gain = least_squares_scales(weight, result.q, result.qparams, damped, options.get("keep"))
        del damped
        result = GPTQResult(result.q, QParams(scale, result.qparams.zero_point), result.row_loss - gain / 2, result.dampening_frac)
    return result


REFIT_ROW_CHUNKS = 2  # a refit's temporaries are a half-weight at a time (the preflight counts them so)


def least_squares_scales(
    weight: torch.Tensor, codes: torch.Tensor, qp: QParams, hessian: torch.Tensor, keep: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """The scales that best fit fixed codes: per row, s minimising the layer-wise error
    (w - s (q - z)) H (w - s (q - z))^T, one unknown per group: M s = b with
    M[g, h] = c_g H_gh c_h^T and b[g] = c_g (H w^T)_g, c = q - z. A row keeps its scales where
    the fitted ones, rounded to the scales' dtype, are not better (or not positive).

    `hessian` is the damped one GPTQ solved with. Returns the scales, laid out as `qp`'s, and
    each row's decrease of the error. Dead columns and pruned weights have code c = 0 (and
    the dead ones no Hessian terms), so they take no part.
    """
    rows, cols = codes.shape
    old = qp.scale.double().reshape(rows, -1)
    groups = old.shape[1]
    size = cols // groups
    m = torch.empty(rows, groups, groups, dtype=torch.float64, device=codes.device)
    b = torch.empty(rows, groups, dtype=torch.float64, device=codes.device)
    chunk = -(-rows // REFIT_ROW_CHUNKS)
    for r1 in range(0, rows, chunk):
        part = slice(r1, r1 + chunk)
        c = codes[part].float()
        if qp.zero_point is not None:
            c = c.view(-1, groups, size).sub_(qp.zero_point[part].float().reshape(-1, groups, 1)).view(-1, cols)
        w = weight[part].float() if keep is None else weight[part].float() * keep[part]
        for g in range(groups):
            cols_g = slice(g * size, (g + 1) * size)
            through = c[:, cols_g] @ hessian[cols_g]  # group g's codes through H: row g of M, entry g of b
            b[part, g] = torch.linalg.vecdot(through, w).double()
            m[part, g] = torch.linalg.vecdot(through.view(-1, groups, size), c.view(-1, groups, size)).double()
    # the error, up to its constant w H w^T, is a difference of near-equal terms: in float64
    ridge = 1e-9 * m.diagonal(dim1=1, dim2=2).mean(-1).clamp_min(1e-30)  # a group with no nonzero code keeps its scale
    eye = torch.eye(groups, dtype=torch.float64, device=codes.device)
    fitted = torch.linalg.solve(m + ridge[:, None, None] * eye, (b + ridge[:, None] * old)[..., None]).squeeze(-1)
    fitted = fitted.to(qp.scale.dtype).double()

    def error(s: torch.Tensor) -> torch.Tensor:
        return (s[:, None, :] @ m @ s[:, :, None]).reshape(rows) - 2 * (b * s).sum(-1)

    usable = (torch.isfinite(fitted) & (fitted > 0)).all(-1)
    gain = torch.where(usable, error(old) - error(torch.where(usable[:, None], fitted, old)), 0.0).clamp_min(0)
    scale = torch.where((gain > 0)[:, None], fitted, old).to(qp.scale.dtype).reshape(qp.scale.shape)
    return scale, gain.float()


def float_target(weight: torch.Tensor, hessian: torch.Tensor, drift: torch.Tensor, alpha: float, dampening_frac: float = 0.01) -> torch.Tensor:
    """The weight GPTQ should approximate so that the layer's output nears the float model's.

    Plain GPTQ minimizes ||(Q - W) X|| on the inputs X the already-compressed layers before it
    produce, so their error is never paid back. Against the float model's inputs X_f,
    ||Q X - W X_f||^2 = ||(Q - W*) X||^2 + const with W* = W + W (X_f - X) X^T (X X^T)^-1, the
    same Hessian and a moved target; `drift` is the cross term in the Hessian's scale
    (ActivationStats.drift). `alpha` takes that fraction of the move: the cross term comes from
    the calibration tokens only, and the whole move fits them too closely. H is damped as GPTQ
    damps it (second_order.damped_cholesky).
    """
    dtype = torch.promote_types(weight.dtype, torch.float32)
    w = weight.to(dtype)
    diag = live_diagonal(hessian, dtype)
    lower, _ = damped_cholesky(lambda: hessian.to(dtype, copy=True), diag, diag.mean(), dampening_frac)
    # W C H^-1 = (H^-1 C^T W^T)^T, H symmetric
    return (w + alpha * torch.cholesky_solve(drift.to(dtype).T @ w.T, lower).T).to(weight.dtype)


def _coder(args: QuantizationArgs) -> Callable[..., torch.Tensor]:
    """x, scale, zero[, out] -> the codes of x as floats: clamp(x / scale + zero) on the format's grid."""
    qmin, qmax = qrange(args)
    if args.type == QuantizationType.FLOAT:
        def fp8(x: torch.Tensor, s: torch.Tensor, z: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
            coded = torch.addcdiv(z, x, s, out=out).clamp_(qmin, qmax)
            return coded.copy_(coded.to(torch.float8_e4m3fn))
        return fp8

    def integer(x: torch.Tensor, s: torch.Tensor, z: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        return torch.addcdiv(z, x, s, out=out).clamp_(qmin, qmax).round_()
    return integer


def _per_group(qp: QParams, rows: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and zero point as float [groups, rows] tables (one group for per-channel and per-tensor)."""
    def table(t: torch.Tensor) -> torch.Tensor:
        t = t.float()
        return (t.reshape(rows, -1) if t.numel() > 1 else t.reshape(1, 1).expand(rows, 1)).T.contiguous()

    scale = table(qp.scale)
    return scale, torch.zeros_like(scale) if qp.zero_point is None else table(qp.zero_point)


class GPTQModifier(QuantizationModifier):
    """GPTQ: quantization that compensates each column's rounding error through the Hessian.

    Linears that read the same input (q/k/v, gate/up) share one Hessian and are solved as one
    stacked matrix, which gives the same result per row in fewer, larger steps.
    `actorder`: "static" (llm-compressor's; "weight" is its alias), "group_aware" (GPTQModel's
    act_group_aware), or null (natural order); all three store plain group scales, no g_idx.
    """

    block_size: int = Field(128, ge=1)
    dampening_frac: float = Field(0.01, gt=0)
    actorder: Order = "static"
    offload_hessians: bool = False
    # 0: plain GPTQ; up to 1: aim each Linear's output that far at the float model's (float_target)
    float_target: float = Field(0.0, ge=0.0, le=1.0)
    # rounds of least-squares scales after the sweep (refitted); 0: the observer's scales, as llm-compressor
    refit_scales: int = Field(1, ge=0)
    # shrink factors of each row's min-max range that GPTQ also runs with, each row keeping the run
    # with least error (row_searched); None: CLIP_SEARCH for per-channel schemes of 4 bits or fewer
    clip_search: list[float] | None = None

    @field_validator("clip_search")
    @classmethod
    def _clip_search(cls, value: list[float] | None) -> list[float] | None:
        if value is not None and not all(0 < f < 1 for f in value):
            raise ModelPressError(f"GPTQModifier.clip_search: {value} must be shrink factors between 0 and 1 (e.g. [0.9, 0.8]); [] turns it off")
        return value

    def shrinks(self, args: QuantizationArgs) -> tuple[float, ...]:
        """The clip search a scheme gets: per channel, one scale spans a whole row and clipping matters most."""
        if self.clip_search is not None:
            return tuple(self.clip_search)
        narrow = args.type == QuantizationType.INT and args.num_bits <= 4
        return CLIP_SEARCH if narrow and args.strategy == QuantizationStrategy.CHANNEL else ()

    @field_validator("actorder", mode="before")
    @classmethod
    def _actorder(cls, value: Any) -> Any:
        if value in ("group", "dynamic", True):
            raise ModelPressError(
                f"GPTQModifier.actorder: {value!r} (g_idx) was removed from compressed-tensors 0.20 and vLLM; "
                "use 'static' (activation order, stored in natural order), 'group_aware' or null"
            )
        return None if value is False else "static" if value == "weight" else value

    @model_validator(mode="after")
    def _record_actorder(self) -> "GPTQModifier":
        for scheme in self.groups.values():  # the checkpoint says how group scales were found
            w = scheme.weights
            if w is not None and w.strategy == QuantizationStrategy.GROUP and w.actorder is None and self.actorder:
                w.actorder = "static"  # group-aware too: an act order stored without g_idx
        return self

    def needs_hessians(self) -> bool:
        return True

    def needs_data(self) -> bool:
        return True

    def needs_float_inputs(self) -> bool:
        return self.float_target > 0

    def plan(self, model: torch.nn.Module) -> Plan:
        plan = super().plan(model)
        if self.float_target:
            _, layers = find_decoder_layers(model)
            odd = next((i for i, layer in enumerate(layers) if find_parts(layer) is None), None)
            if odd is not None:
                raise ModelPressError(
                    f"GPTQModifier.float_target: decoder layer {odd} ({type(layers[odd]).__name__}) is not attention then a "
                    "dense MLP, the layout whose float inputs the layer pass carries; set float_target 0"
                )
        return plan

    def bind(self, plan: Plan, earlier: list[Planned], later: list[Planned]) -> Plan:
        smoothing = next((type(m).__name__ for m, _ in earlier + later if isinstance(m, SmoothingModifier)), None)
        if self.float_target and smoothing:
            raise ModelPressError(
                f"GPTQModifier.float_target: not with {smoothing} in the same recipe (smoothing rescales the "
                "compressed model's inputs, not the float model's); set float_target 0"
            )
        return plan

    def apply(
        self, plan: Plan, modules: dict[str, torch.nn.Linear], stats: dict[str, ActivationStats], state: LayerState
    ) -> dict[str, QuantizedLinear]:
        done: dict[str, QuantizedLinear] = {}
        for names in _stacks(modules, stats, plan):
            scheme = plan[names[0]].scheme
            args = scheme.weights
            weights = [modules[n].weight.data for n in names]
            if stats.get(names[0]) is None or stats[names[0]].xtx is None:
                raise ModelPressError(f"GPTQModifier: no Hessian for {names[0]}; GPTQ needs calibration data")
            hessian = stats[names[0]].hessian.to(weights[0].device)
            weight = torch.cat(weights)
            if self.float_target:
                if stats[names[0]].cross is None:
                    raise ModelPressError(
                        f"GPTQModifier.float_target: no float-model inputs for {names[0]} (its layer is not laid out as "
                        "the sequential pass splits layers); set float_target 0"
                    )
                drift = stats[names[0]].drift.to(weight.device)
                weight = float_target(weight, hessian, drift, self.float_target, self.dampening_frac)
            keep = None
            if any(n in state.masks for n in names):
                keep = torch.cat([state.masks.get(n, torch.ones_like(w, dtype=torch.bool)) for n, w in zip(names, weights)])
            result = refitted(
                weight,
                hessian,
                args,
                self.refit_scales,
                self.shrinks(args),
                block_size=self.block_size,
                dampening_frac=self.dampening_frac,
                actorder=self.actorder,
                observer=weight_observer(self.observer_name(scheme)),
                keep=keep,
                importance=importance(self.observer_name(scheme), stats[names[0]]),
            )
            rows = [w.shape[0] for w in weights]
            for name, q, scale, zp, row_loss in zip(
                names,
                result.q.split(rows),
                _split_rows(result.qparams.scale, rows),
                _split_rows(result.qparams.zero_point, rows),
                result.row_loss.split(rows),
            ):
                qparams = QParams(scale, zp)
                modules[name].weight.data = dequantize(q, qparams, args)
                done[name] = QuantizedLinear(scheme, q, qparams, input_qparams(scheme, stats.get(name), scale.dtype))
                state.losses[name] = float(row_loss.sum())
                if result.dampening_frac != self.dampening_frac:
                    state.dampening[name] = result.dampening_frac
        return done


def _stacks(modules: dict[str, torch.nn.Linear], stats: dict[str, ActivationStats], plan: Plan) -> list[list[str]]:
    """Modules that share a Hessian and a per-row scheme, as lists to solve together."""
    stacks: dict[tuple[Any, ...], list[str]] = {}
    for name in modules:
        scheme = plan[name].scheme
        per_tensor = scheme.weights.strategy == QuantizationStrategy.TENSOR  # one scale: rows not separable
        key = (name,) if per_tensor else (id(stats.get(name)), id(scheme))
        stacks.setdefault(key, []).append(name)
    return list(stacks.values())


def _split_rows(t: torch.Tensor | None, rows: list[int]) -> list[torch.Tensor | None]:
    """A stack's scales or zero points cut back into each module's rows."""
    if t is None or len(rows) == 1:  # one module: per-tensor parameters have no rows to split
        return [t] * len(rows)
    return list(t.split(rows))
