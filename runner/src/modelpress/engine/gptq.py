"""GPTQ (Frantar et al., 2022): quantize a weight column by column, compensating each column's
rounding error on the columns not yet quantized, so the layer's output moves as little as possible.

`GPTQModifier` is the recipe's side: it stacks the Linears that share a Hessian, keeps the mask of
a SparseGPT run before it, and calls `gptq`, the sweep, per stack. The damped inverse Hessian and
the lazy-batch column loop it shares with SparseGPT are in second_order.py.
"""

from dataclasses import dataclass
from typing import Any, Callable, ClassVar, Literal

import torch
from compressed_tensors.quantization import QuantizationArgs, QuantizationStrategy, QuantizationType
from pydantic import Field, field_validator, model_validator

from modelpress.engine.errors import ModelPressError
from modelpress.engine.modifier import LayerState, Plan
from modelpress.engine.quantize import QParams, QuantizedLinear, dequantize, minmax_qparams, mse_qparams, qrange
from modelpress.engine.rtn import QuantizationModifier, input_qparams
from modelpress.engine.second_order import ColumnStep, activation_order, aligned_block_size, inverse_hessian, sweep, sweep_rows
from modelpress.engine.statistics import ActivationStats

Observer = Callable[[torch.Tensor, QuantizationArgs, torch.dtype], QParams]


@dataclass
class GPTQResult:
    q: torch.Tensor  # codes in natural column order, as quantize() returns them
    qparams: QParams
    row_loss: torch.Tensor  # per output row: sum(e^2) / 2 of the sweep
    dampening_frac: float


def gptq(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    args: QuantizationArgs,
    block_size: int = 128,
    dampening_frac: float = 0.01,
    actorder: bool = True,
    observer: Observer = minmax_qparams,
    keep: torch.Tensor | None = None,
) -> GPTQResult:
    """Quantize `weight` [out, in] given the Hessian [in, in] of its layer-wise error.

    With `actorder`, columns are visited by descending Hessian diagonal (the static order: the
    result is stored in natural order, so it costs nothing at inference), and the scales are
    observed up front on the whole weight. Without it, a group's scale is observed when the
    sweep reaches the group, on the weights as the earlier columns' errors left them.
    `keep` (bool, [out, in]) forces the other weights to zero: a sparsity mask survives.
    """
    w = weight.float().clone()
    rows, cols = w.shape
    dtype = weight.dtype
    group = args.strategy == QuantizationStrategy.GROUP
    size = args.group_size if group else cols

    order = activation_order(hessian) if actorder else torch.arange(cols, device=w.device)
    inverse = inverse_hessian(hessian.float()[order][:, order], dampening_frac)
    w[:, inverse.dead[torch.argsort(order)]] = 0
    if keep is not None:
        w *= keep

    static = not group or actorder
    if static:
        qp = observer(w, args, dtype)
        scale, zero = _per_column(qp, args, rows, cols)
        scale_t, zero_t = scale[:, order].T.contiguous(), zero[:, order].T.contiguous()
    else:
        scale_t = torch.empty(cols, rows, dtype=torch.float32, device=w.device)
        zero_t = torch.zeros(cols, rows, dtype=torch.float32, device=w.device)
        group_scales, group_zeros = [], []
    # W^T in sweep order: a column of W is a contiguous row (see sweep)
    wt = w[:, order].T.contiguous()
    keep_t = keep[:, order].T.contiguous() if keep is not None else None
    to_codes = _coder(args)
    quantize = _quantizing_step(to_codes, scale_t, zero_t, keep_t)

    def step(block: torch.Tensor, i: int, col: int) -> torch.Tensor:
        if col % size == 0:
            gqp = observer(block[i : i + size].T, args, dtype)
            group_scales.append(gqp.scale)
            group_zeros.append(gqp.zero_point)
            scale_t[col : col + size] = gqp.scale.float().reshape(1, rows)
            if gqp.zero_point is not None:
                zero_t[col : col + size] = gqp.zero_point.float().reshape(1, rows)
        return quantize(block, i, col)

    blocks = aligned_block_size(block_size, size if group else 1)
    if static:  # scales known up front: every output row is solved on its own
        row_loss = sweep_rows(wt, inverse.upper, blocks, lambda r: _quantizing_step(
            to_codes, scale_t[:, r].contiguous(), zero_t[:, r].contiguous(), keep_t[:, r].contiguous() if keep_t is not None else None))
    else:
        row_loss = sweep(wt, inverse.upper, blocks, step)
    # the swept weights are the dequantized codes up to rounding far below a code step
    codes = to_codes(wt, scale_t, zero_t)[torch.argsort(order)].T.contiguous()
    codes = codes.to(torch.float8_e4m3fn if args.type == QuantizationType.FLOAT else torch.int8)
    if not static:
        zp = torch.cat(group_zeros, dim=1) if group_zeros[0] is not None else None
        qp = QParams(torch.cat(group_scales, dim=1), zp)
    return GPTQResult(codes, qp, row_loss, inverse.dampening_frac)


def _quantizing_step(to_codes: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor], scale_t: torch.Tensor,
                     zero_t: torch.Tensor, keep_t: torch.Tensor | None) -> ColumnStep:
    """The sweep's step: a column (a row of W^T, masked by `keep_t`) to its dequantized codes."""

    def step(block: torch.Tensor, i: int, col: int) -> torch.Tensor:
        x = block[i] if keep_t is None else block[i] * keep_t[col]
        s, z = scale_t[col], zero_t[col]
        return to_codes(x, s, z).sub_(z).mul_(s)

    return step


def _coder(args: QuantizationArgs) -> Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]:
    """x, scale, zero -> the codes of x as floats: clamp(x / scale + zero) on the format's grid."""
    qmin, qmax = qrange(args)
    if args.type == QuantizationType.FLOAT:
        return lambda x, s, z: torch.addcdiv(z, x, s).clamp_(qmin, qmax).to(torch.float8_e4m3fn).float()
    return lambda x, s, z: torch.addcdiv(z, x, s).clamp_(qmin, qmax).round_()


def _per_column(qp: QParams, args: QuantizationArgs, rows: int, cols: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and zero point of every weight as [out, in] float matrices (natural column order)."""
    scale = qp.scale.float()
    zero = qp.zero_point.float() if qp.zero_point is not None else torch.zeros_like(scale)
    if args.strategy == QuantizationStrategy.GROUP:
        index = torch.arange(cols, device=scale.device) // args.group_size
        return scale[:, index], zero[:, index]
    return scale.reshape(-1, 1).expand(rows, cols), zero.reshape(-1, 1).expand(rows, cols)


class GPTQModifier(QuantizationModifier):
    """GPTQ: quantization that compensates each column's rounding error through the Hessian.

    Linears that read the same input (q/k/v, gate/up) share one Hessian and are solved as one
    stacked matrix, which gives the same result per row in fewer, larger steps.
    """

    needs_hessians: ClassVar[bool] = True
    block_size: int = Field(128, ge=1)
    dampening_frac: float = Field(0.01, gt=0)
    actorder: Literal["static", "weight"] | None = "static"
    offload_hessians: bool = False

    @field_validator("actorder", mode="before")
    @classmethod
    def _actorder(cls, value: Any) -> Any:
        if value in ("group", "dynamic", True):
            raise ModelPressError(
                f"GPTQModifier.actorder: {value!r} (g_idx) was removed from compressed-tensors 0.20 and vLLM; "
                "use 'static' (activation order, stored in natural order) or null"
            )
        return None if value is False else value

    @model_validator(mode="after")
    def _record_actorder(self) -> "GPTQModifier":
        for scheme in self.groups.values():  # the checkpoint says how group scales were found
            w = scheme.weights
            if w is not None and w.strategy == QuantizationStrategy.GROUP and w.actorder is None and self.actorder:
                w.actorder = self.actorder
        return self

    def needs_data(self) -> bool:
        return True

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
            keep = None
            if any(n in state.masks for n in names):
                keep = torch.cat([state.masks.get(n, torch.ones_like(w, dtype=torch.bool)) for n, w in zip(names, weights)])
            result = gptq(
                torch.cat(weights),
                stats[names[0]].hessian.to(weights[0].device),
                args,
                self.block_size,
                self.dampening_frac,
                actorder=self.actorder is not None,
                observer=mse_qparams if "mse" in (self.weight_observer or args.observer or "") else minmax_qparams,
                keep=keep,
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
