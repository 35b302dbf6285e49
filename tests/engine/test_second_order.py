"""GPTQ and SparseGPT on small random layers: against the papers' formulas, RTN and magnitude pruning."""

import pytest
import torch
from compressed_tensors.quantization import QuantizationArgs

from modelpress.engine.errors import ModelPressError
from modelpress.engine.gptq import CLIP_SEARCH, GPTQModifier, gptq, least_squares_scales, refitted, row_searched
from modelpress.engine.quantize import QParams, dequantize, minmax_qparams, qrange, quantize
from modelpress.engine.second_order import damped_hessian, group_aware_order, inverse_hessian
from modelpress.engine.sparsegpt import sparsegpt

ROWS, COLS, TOKENS = 48, 192, 1536


@pytest.fixture(scope="module")
def layer() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A weight, correlated inputs with uneven channel scales and one dead channel, and H = 2 X^T X / n."""
    g = torch.Generator().manual_seed(0)
    mix = torch.randn(COLS, COLS, generator=g) / COLS**0.5 + torch.eye(COLS)
    x = torch.randn(TOKENS, COLS, generator=g) @ mix * torch.linspace(0.2, 3.0, COLS)
    x[:, 7] = 0
    w = torch.randn(ROWS, COLS, generator=g)
    return w, x, 2 * x.T @ x / TOKENS


def output_error(w_new: torch.Tensor, w: torch.Tensor, x: torch.Tensor) -> float:
    return float(((w_new.double() - w.double()) @ x.double().T).square().mean())


def paper_gptq(w: torch.Tensor, h: torch.Tensor, args: QuantizationArgs, order: torch.Tensor, dynamic_groups: bool) -> torch.Tensor:
    """GPTQ as its paper states it, column by column in float64 with an explicit inverse Hessian:
    q = quant(w_j); W -= ((w_j - q) / Hinv_jj) Hinv_j,: ; Hinv -= Hinv_:,j Hinv_j,: / Hinv_jj."""
    w, h = w.double().clone(), h.double().clone()
    dead = torch.diag(h) == 0
    h[dead, dead] = 1
    w[:, dead] = 0
    h += 0.01 * torch.diag(h).mean() * torch.eye(COLS, dtype=torch.float64)
    hinv = torch.linalg.inv(h)
    qmin, qmax = qrange(args)
    size = args.group_size or COLS
    scales = {} if dynamic_groups else {"all": minmax_qparams(w.float(), args, torch.float32).scale.double()}
    for j in order.tolist():
        if dynamic_groups:
            group = j // size
            if group not in scales:
                scales[group] = minmax_qparams(w[:, group * size : (group + 1) * size].float(), args, torch.float32).scale.double()
            s = scales[group][:, 0]
        else:
            s = scales["all"][:, j // size if args.group_size else 0]
        q = (w[:, j] / s).round().clamp(qmin, qmax) * s
        err = (w[:, j] - q) / hinv[j, j]
        w -= err[:, None] * hinv[j][None, :]
        w[:, j] = q
        hinv -= hinv[:, j : j + 1] @ hinv[j : j + 1, :] / hinv[j, j]
    return w


@pytest.mark.parametrize("strategy", [{"strategy": "channel"}, {"strategy": "group", "group_size": 32}])
@pytest.mark.parametrize("actorder", ["static", "group_aware", None])
def test_gptq_is_the_papers_update_and_beats_rtn(layer, strategy: dict, actorder: str | None) -> None:
    w, x, h = layer
    args = QuantizationArgs(num_bits=4, symmetric=True, **strategy)
    result = gptq(w, h, args, block_size=64, actorder=actorder)
    ours = dequantize(result.q, result.qparams, args)
    grouped = "group_size" in strategy
    if actorder is None:
        order = torch.arange(COLS)
    elif actorder == "group_aware" and grouped:
        order = group_aware_order(h, args.group_size)
    else:
        order = torch.argsort(torch.diag(h), descending=True, stable=True)
    dynamic = actorder != "static" and grouped
    reference = paper_gptq(w, h, args, order, dynamic)
    if dynamic:  # a group's scale is read off updated weights: float32 vs float64 can flip a rounding
        assert output_error(ours, w, x) == pytest.approx(output_error(reference, w, x), rel=0.01)
    else:
        assert torch.allclose(ours.double(), reference, atol=1e-5)
    assert torch.all(ours[:, 7] == 0)  # the dead input's weights are dropped
    rtn_qp = minmax_qparams(w, args, w.dtype)
    rtn = dequantize(quantize(w, rtn_qp, args), rtn_qp, args)
    assert output_error(ours, w, x) < 0.95 * output_error(rtn, w, x)
    # the sweep's loss is exactly the damped layer-wise error it left: 1/2 tr(dW (H + damp I) dW^T)
    live = w.clone()
    live[:, 7] = 0
    damped = h.double() + 0.01 * torch.diag(h).double()[torch.diag(h) > 0].sum() / COLS * torch.eye(COLS, dtype=torch.float64)
    dw = ours.double() - live.double()
    expected = 0.5 * torch.trace(dw @ damped @ dw.T).item()
    assert result.row_loss.sum().item() == pytest.approx(expected, rel=1e-3)


def test_gptq_keeps_a_sparsity_mask(layer) -> None:
    w, x, h = layer
    keep = torch.rand(w.shape, generator=torch.Generator().manual_seed(1)) > 0.5
    args = QuantizationArgs(num_bits=4, symmetric=False, strategy="group", group_size=32)
    result = gptq(w * keep, h, args, keep=keep)
    ours = dequantize(result.q, result.qparams, args)
    assert torch.all(ours[~keep] == 0)
    assert (ours[keep] != 0).float().mean() > 0.8


def damped_error(q: torch.Tensor, w: torch.Tensor, h: torch.Tensor, frac: float = 0.01) -> torch.Tensor:
    """Per row, the damped layer-wise error (q - w) Hd (q - w)^T GPTQ minimises, in float64."""
    dw = q.double() - w.double()
    dw[:, torch.diag(h) == 0] = 0  # GPTQ drops a dead input's weights: no error counted there
    return ((dw @ damped_hessian(h, frac).double()) * dw).sum(1)


@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("strategy", [{"strategy": "channel"}, {"strategy": "group", "group_size": 32}])
def test_refitted_scales_are_each_rows_least_squares_and_the_loss_is_the_error_left(layer, symmetric: bool, strategy: dict) -> None:
    w, x, h = layer
    args = QuantizationArgs(num_bits=4, symmetric=symmetric, **strategy)
    plain = gptq(w, h, args)
    hd = damped_hessian(h, plain.dampening_frac).double()
    scale, gain = least_squares_scales(w, plain.q, plain.qparams, hd.float())
    # direct: per row, the codes as a [cols, groups] basis, solved in float64
    groups = plain.qparams.scale.shape[1]
    size = COLS // groups
    c = plain.q.double().view(ROWS, groups, size)
    if plain.qparams.zero_point is not None:
        c = c - plain.qparams.zero_point.double()[..., None]
    for row in range(0, ROWS, 7):
        basis = torch.block_diag(*[c[row, g][:, None] for g in range(groups)])
        expected = torch.linalg.solve(basis.T @ hd @ basis, basis.T @ hd @ w[row].double())
        assert torch.allclose(scale[row].double(), expected, rtol=1e-4)
    assert torch.all(gain > 0)
    refit = refitted(w, h, args, 1)
    assert torch.equal(refit.q, plain.q) and torch.equal(refit.qparams.scale, scale)
    ours = dequantize(refit.q, refit.qparams, args)
    error = damped_error(ours, w, h)
    assert torch.all(error <= damped_error(dequantize(plain.q, plain.qparams, args), w, h))
    assert torch.allclose(2 * refit.row_loss.double(), error, rtol=1e-4)  # the loss reported is the error left
    assert output_error(ours, w, x) < output_error(dequantize(plain.q, plain.qparams, args), w, x)


def test_more_rounds_never_raise_the_error_and_zero_is_plain_gptq(layer) -> None:
    w, _, h = layer
    args = QuantizationArgs(num_bits=4, symmetric=False, strategy="group", group_size=32)
    plain = gptq(w, h, args, actorder=None)
    zero = refitted(w, h, args, 0, actorder=None)
    assert torch.equal(zero.q, plain.q) and torch.equal(zero.qparams.scale, plain.qparams.scale)
    errors = [damped_error(dequantize(r.q, r.qparams, args), w, h).sum().item()
              for r in (refitted(w, h, args, n, actorder=None) for n in range(4))]
    assert all(b <= a * (1 + 1e-6) for a, b in zip(errors, errors[1:]))
    assert errors[3] < 0.97 * errors[0]


def test_a_refit_keeps_what_it_cannot_better() -> None:
    """A group whose codes are all zero has no scale to fit; a row fitted to a negative scale, or
    one that rounding in the scales' dtype would leave worse, keeps the observer's."""
    w = torch.tensor([[0.5, -0.5, 0.0, 0.0], [1.0, 2.0, 3.0, 4.0]])
    h = torch.eye(4)
    old = QParams(torch.tensor([[0.09, 0.3], [1.0, 1.0]]), None)
    codes = torch.tensor([[5, -5, 0, 0], [-1, -2, -3, -4]], dtype=torch.int8)  # row 1 fits only with s = -1
    scale, gain = least_squares_scales(w, codes, old, h)
    assert scale[0, 0] == pytest.approx(0.1) and scale[0, 1] == pytest.approx(0.3)  # fitted / nothing to fit
    assert gain[0] > 0
    assert torch.equal(scale[1], old.scale[1]) and gain[1] == 0
    coarse = QParams(torch.tensor([[1.0]], dtype=torch.bfloat16), None)
    near = torch.tensor([[1.001, 2.002, 3.003]])  # the best scale, 1.001, rounds back to 1 in bfloat16
    scale, gain = least_squares_scales(near, torch.tensor([[1, 2, 3]], dtype=torch.int8), coarse, torch.eye(3))
    assert scale.dtype == torch.bfloat16 and scale.item() == 1.0 and gain.item() == 0


def test_a_refit_keeps_a_sparsity_mask_and_per_tensor_scales(layer) -> None:
    w, x, h = layer
    keep = torch.rand(w.shape, generator=torch.Generator().manual_seed(1)) > 0.5
    args = QuantizationArgs(num_bits=4, symmetric=True, strategy="group", group_size=32)
    result = refitted(w * keep, h, args, 2, keep=keep)
    assert torch.all(dequantize(result.q, result.qparams, args)[~keep] == 0)
    tensor = QuantizationArgs(num_bits=8, symmetric=True, strategy="tensor")
    assert torch.equal(refitted(w, h, tensor, 2).qparams.scale, gptq(w, h, tensor).qparams.scale)


def test_refit_scales_is_a_count_of_rounds() -> None:
    with pytest.raises(ValueError, match="refit_scales"):
        GPTQModifier(targets=["Linear"], scheme="W4A16", refit_scales=-1)


@pytest.mark.parametrize("structure", [(0, 0), (2, 4)])
def test_sparsegpt_hits_the_pattern_and_beats_magnitude(layer, structure: tuple[int, int]) -> None:
    w, x, h = layer
    n, m = structure
    result = sparsegpt(w, h, 0.5, n, m, block_size=64)
    assert torch.equal(result.weight != 0, result.keep)
    if n:
        assert torch.all((result.weight.reshape(ROWS, -1, m) == 0).sum(-1) == n)
        magnitude = w.abs().reshape(ROWS, -1, m).topk(n, dim=-1, largest=False).indices
        keep = torch.ones(ROWS, COLS // m, m, dtype=torch.bool).scatter_(-1, magnitude, False).reshape(ROWS, COLS)
    else:
        assert (result.weight == 0).float().mean().item() == pytest.approx(0.5, abs=0.01)
        keep = w.abs() > w.abs().flatten().kthvalue(w.numel() // 2).values
    assert output_error(result.weight, w, x) < 0.9 * output_error(w * keep, w, x)


def test_dampening_is_raised_when_cholesky_fails_and_reported() -> None:
    indefinite = torch.tensor([[1.0, 3.0], [3.0, 1.0]])  # eigenvalues 4 and -2
    inverse = inverse_hessian(indefinite, 0.01)
    assert inverse.dampening_frac == pytest.approx(10.0)
    result = gptq(torch.randn(4, 2), indefinite, QuantizationArgs(num_bits=8, strategy="channel"))
    assert result.dampening_frac == pytest.approx(10.0)
    with pytest.raises(ModelPressError, match="dampening_frac"):
        inverse_hessian(torch.tensor([[1.0, 30.0], [30.0, 1.0]]), 0.01)


def test_group_aware_order_keeps_groups_whole_most_important_first(layer) -> None:
    _, _, h = layer
    size = 32
    order = group_aware_order(h, size)
    diag = torch.diag(h)
    assert sorted(order.tolist()) == list(range(COLS))
    blocks = order.reshape(-1, size)
    assert torch.all(blocks // size == blocks[:, :1] // size)  # a stretch of the sweep is one group
    peaks = diag[blocks].amax(1)
    assert torch.all(peaks[:-1] >= peaks[1:])
    assert torch.all(diag[blocks][:, :-1] >= diag[blocks][:, 1:])



def test_the_sweep_runs_on_one_thread_and_gives_the_threads_back() -> None:
    from modelpress.engine import second_order

    original = torch.get_num_threads()
    torch.set_num_threads(2)  # so that "one" differs from what the test starts with
    before = torch.get_num_threads()
    seen: list[int] = []
    step = lambda block, i, col: (seen.append(torch.get_num_threads()), block[i].round())[1]  # noqa: E731
    wt, h = torch.randn(8, 3), torch.eye(8) * 2
    second_order.sweep(wt, second_order.inverse_hessian(h, 0.01, torch.arange(8)).upper, 4, step)
    assert seen == [1] * 8 and torch.get_num_threads() == before
    with pytest.raises(ZeroDivisionError):
        with second_order.one_thread():
            1 / 0
    assert torch.get_num_threads() == before == 2
    torch.set_num_threads(original)


@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("strategy", [{"strategy": "channel"}, {"strategy": "group", "group_size": 32}])
def test_a_clip_search_keeps_each_row_of_its_best_run_and_never_raises_a_rows_error(layer, symmetric: bool, strategy: dict) -> None:
    w, x, h = layer
    args = QuantizationArgs(num_bits=4, symmetric=symmetric, **strategy)
    shrinks = (0.9, 0.8, 0.7)
    plain = gptq(w, h, args)
    searched = row_searched(w, h, args, shrinks)
    runs = [plain] + [gptq(w, h, args, scales=minmax_qparams(w * (torch.diag(h) != 0) * f, args, torch.float32)) for f in shrinks]
    kept = 0
    for row in range(ROWS):
        same = [i for i, r in enumerate(runs) if torch.equal(r.q[row], searched.q[row]) and torch.equal(r.qparams.scale[row], searched.qparams.scale[row])]
        assert same, f"row {row} is no run's row"
        assert searched.row_loss[row] == min(r.row_loss[row] for r in runs)
        kept += same[0] == 0
    assert 0 < kept < ROWS  # some rows keep the observer's scales, some take a shrunk range
    error = damped_error(dequantize(searched.q, searched.qparams, args), w, h)
    assert torch.all(error <= damped_error(dequantize(plain.q, plain.qparams, args), w, h) * (1 + 1e-6))
    assert torch.allclose(2 * searched.row_loss.double(), error, rtol=1e-4)  # the loss reported is the error left
    assert output_error(dequantize(searched.q, searched.qparams, args), w, x) < output_error(dequantize(plain.q, plain.qparams, args), w, x)


def test_no_clip_search_is_plain_gptq_and_per_tensor_scales_are_left_alone(layer) -> None:
    w, _, h = layer
    channel = QuantizationArgs(num_bits=4, symmetric=True, strategy="channel")
    assert torch.equal(row_searched(w, h, channel, ()).q, gptq(w, h, channel).q)
    tensor = QuantizationArgs(num_bits=8, symmetric=True, strategy="tensor")
    assert torch.equal(row_searched(w, h, tensor, (0.8,)).qparams.scale, gptq(w, h, tensor).qparams.scale)


def test_a_sweep_leaves_its_inverse_hessian_as_it_was(layer) -> None:
    """One factorisation serves every run of a clip search: a sweep must not consume it."""
    w, _, h = layer
    args = QuantizationArgs(num_bits=4, symmetric=True, strategy="channel")
    inverse = inverse_hessian(h, 0.01, torch.argsort(torch.diag(h), descending=True, stable=True))
    before = inverse.upper.clone()
    first = gptq(w, h, args, inverse=inverse)
    assert torch.equal(inverse.upper, before)
    assert torch.equal(gptq(w, h, args, inverse=inverse).q, first.q) and torch.equal(first.q, gptq(w, h, args).q)


def test_a_clip_search_keeps_a_sparsity_mask(layer) -> None:
    w, _, h = layer
    keep = torch.rand(w.shape, generator=torch.Generator().manual_seed(2)) > 0.5
    args = QuantizationArgs(num_bits=4, symmetric=False, strategy="channel")
    result = row_searched(w * keep, h, args, (0.9, 0.7), keep=keep)
    assert torch.all(dequantize(result.q, result.qparams, args)[~keep] == 0)


def test_the_clip_search_defaults_to_4_bit_per_channel_scales_and_refuses_factors_outside_0_1() -> None:
    def shrinks(**weights) -> tuple[float, ...]:
        modifier = GPTQModifier(config_groups={"g": {"targets": ["Linear"], "weights": weights}})
        return modifier.shrinks(modifier.groups["g"].weights)

    assert shrinks(num_bits=4, symmetric=True, strategy="channel") == CLIP_SEARCH
    assert shrinks(num_bits=4, symmetric=True, strategy="group", group_size=64) == ()
    assert shrinks(num_bits=8, symmetric=True, strategy="channel") == ()
    off = GPTQModifier(targets=["Linear"], scheme="W4A16", clip_search=[])
    assert off.shrinks(QuantizationArgs(num_bits=4, strategy="channel")) == ()
    with pytest.raises(ModelPressError, match=r"GPTQModifier.clip_search: \[1.2\] must be shrink factors between 0 and 1"):
        GPTQModifier(targets=["Linear"], scheme="W4A16", clip_search=[1.2])
