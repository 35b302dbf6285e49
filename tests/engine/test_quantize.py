"""Round-to-nearest math against compressed-tensors' conventions and its own quantizer."""

import pytest
import torch
from compressed_tensors.compressors.pack_quantized.helpers import unpack_from_int32
from compressed_tensors.quantization import QuantizationArgs
from compressed_tensors.quantization.lifecycle.forward import fake_quantize

from modelpress.engine.checkpoint_writer import compressed_tensors_of
from modelpress.engine.errors import ModelPressError
from modelpress.engine.quantize import (
    QuantizedLinear,
    dequantize,
    imatrix_mse_qparams,
    imatrix_search,
    minmax_qparams,
    mse_qparams,
    mse_search,
    qparams_from_range,
    quantize,
    searched_qparams,
)
from compressed_tensors.quantization import QuantizationScheme

ARGS = {
    "int4-group-sym": QuantizationArgs(num_bits=4, strategy="group", group_size=32, symmetric=True),
    "int4-group-asym": QuantizationArgs(num_bits=4, strategy="group", group_size=32, symmetric=False),
    "int8-channel-sym": QuantizationArgs(num_bits=8, strategy="channel", symmetric=True),
    "int8-tensor-asym": QuantizationArgs(num_bits=8, strategy="tensor", symmetric=False),
    "fp8-tensor": QuantizationArgs(num_bits=8, type="float", strategy="tensor"),
    "fp8-channel": QuantizationArgs(num_bits=8, type="float", strategy="channel"),
}


@pytest.mark.parametrize("name", sorted(ARGS))
def test_matches_compressed_tensors_fake_quantize(name: str) -> None:
    torch.manual_seed(0)
    w = torch.randn(16, 128)
    args = ARGS[name]
    qp = minmax_qparams(w, args, w.dtype)
    ours = dequantize(quantize(w, qp, args), qp, args)
    theirs = fake_quantize(w, qp.scale, qp.zero_point, args)
    assert torch.allclose(ours, theirs, atol=1e-6)
    if args.type == "int":  # at most half a step away
        assert (ours - w).abs().max() <= qp.scale.max() * 0.5 + 1e-6
    else:  # e4m3 keeps 3 mantissa bits: relative error at most 2^-4 (above the subnormals)
        assert ((ours - w).abs() <= w.abs() / 16 + qp.scale.max() * 2**-9).all()


def test_symmetric_scale_and_zero() -> None:
    args = ARGS["int4-group-sym"]
    w = torch.zeros(2, 32)
    w[0, :] = torch.linspace(-3.0, 1.5, 32)
    qp = minmax_qparams(w, args, w.dtype)
    assert qp.scale[0, 0].item() == pytest.approx(3.0 / 7.5)
    assert qp.scale[1, 0].item() == torch.finfo(torch.float32).eps  # an all-zero group
    q = quantize(w, qp, args)
    assert q.dtype == torch.int8 and q.min() >= -8 and q.max() <= 7
    assert torch.equal(dequantize(q, qp, args)[1], torch.zeros(32))


def test_asymmetric_range_includes_zero() -> None:
    args = ARGS["int8-tensor-asym"]
    qp = qparams_from_range(torch.tensor([1.0]), torch.tensor([3.0]), args, torch.float32)
    # the range is widened to [0, 3]: zero is exactly representable
    assert qp.scale.item() == pytest.approx(3.0 / 255)
    assert dequantize(quantize(torch.zeros(1, 4), qp, args), qp, args).abs().max() == 0


def test_mse_observer_lowers_weight_error() -> None:
    torch.manual_seed(0)
    w = torch.randn(64, 256)
    w[:, ::37] *= 8  # outliers make min-max ranges wasteful
    args = ARGS["int4-group-sym"]
    errors = {}
    for fn in (minmax_qparams, mse_qparams):
        qp = fn(w, args, w.dtype)
        errors[fn.__name__] = ((dequantize(quantize(w, qp, args), qp, args) - w) ** 2).sum().item()
    assert errors["mse_qparams"] < errors["minmax_qparams"]


def test_bfloat16_scales_keep_dtype() -> None:
    w = torch.randn(8, 64).to(torch.bfloat16)
    args = ARGS["int4-group-asym"]
    qp = minmax_qparams(w, args, w.dtype)
    assert qp.scale.dtype == torch.bfloat16 and qp.zero_point.dtype == torch.int8
    assert dequantize(quantize(w, qp, args), qp, args).dtype == torch.bfloat16


def test_packed_tensors_unpack_to_codes() -> None:
    torch.manual_seed(0)
    w = torch.randn(24, 64)
    args = ARGS["int4-group-asym"]
    qp = minmax_qparams(w, args, w.dtype)
    q = quantize(w, qp, args)
    scheme = QuantizationScheme(targets=["Linear"], weights=args)
    tensors = compressed_tensors_of("m", QuantizedLinear(scheme, q, qp))
    assert tensors["m.weight_packed"].shape == (24, 8) and tensors["m.weight_packed"].dtype == torch.int32
    assert tensors["m.weight_zero_point"].shape == (3, 2)
    assert torch.equal(unpack_from_int32(tensors["m.weight_packed"], 4, torch.Size([24, 64])), q)
    zp = unpack_from_int32(tensors["m.weight_zero_point"], 4, torch.Size([24, 2]), packed_dim=0)
    assert torch.equal(zp, qp.zero_point)
    assert tensors["m.weight_shape"].tolist() == [24, 64]


def sequential_search(w: torch.Tensor, args: QuantizationArgs, shrinks, norm: float, patience: int, importance=None):
    """The clipping search as llm-compressor writes it: one factor at a time, per-group best
    kept on a strict improvement, stopping after `patience` factors that improved no group."""
    g = w.reshape(w.shape[0], -1, args.group_size).float() if args.strategy == "group" else w.reshape(w.shape[0], 1, -1).float()
    imp = None if importance is None else (importance / importance.mean()).expand_as(w).reshape(g.shape)
    xmin, xmax = g.amin(-1), g.amax(-1)
    best_err = torch.full(xmin.shape, torch.finfo(torch.float32).max)
    best = torch.ones(xmin.shape)
    idle = 0
    for p in shrinks:
        qp = qparams_from_range(xmin * p, xmax * p, args, torch.float32)
        fq = dequantize(quantize(w, qp, args), qp, args).reshape(g.shape)
        err = (fq - g).abs().pow(norm)
        err = (err * imp if imp is not None else err).sum(-1)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best = torch.where(better, torch.full_like(best, p), best)
        idle = 0 if better.any() else idle + 1
        if patience and idle >= patience:
            break
    return qparams_from_range(xmin * best, xmax * best, args, torch.float32)


@pytest.mark.parametrize("name", ["int4-group-sym", "int4-group-asym", "int8-channel-sym"])
@pytest.mark.parametrize("weighted", [False, True])
def test_batched_search_is_the_sequential_one(name: str, weighted: bool) -> None:
    torch.manual_seed(1)
    w = torch.randn(40, 128) * torch.rand(128) ** 2
    w[:, ::29] *= 6
    importance = torch.rand(128) ** 4 if weighted else None
    args = ARGS[name]
    search = imatrix_search(args) if weighted else mse_search(args)
    ours = searched_qparams(w, args, torch.float32, search, importance)
    ref = sequential_search(w, args, search.shrinks, search.norm, search.patience, importance)
    assert torch.equal(ours.scale, ref.scale)
    assert (ours.zero_point is None and ref.zero_point is None) or torch.equal(ours.zero_point, ref.zero_point)


def test_llm_compressor_grids() -> None:
    args = ARGS["int4-group-asym"]
    imatrix, mse = imatrix_search(args), mse_search(args)
    assert len(imatrix.shrinks) == 20 and imatrix.shrinks[0] == 1 and imatrix.shrinks[-1] == pytest.approx(0.05)
    assert (imatrix.norm, imatrix.patience) == (3.0, 5)
    assert len(mse.shrinks) == 20 and mse.shrinks[-1] == pytest.approx(0.81) and mse.norm == 2.4
    tuned = QuantizationArgs(num_bits=4, strategy="group", group_size=32, observer_kwargs={"grid": 10, "maxshrink": 0.5, "norm": 2})
    assert imatrix_search(tuned).shrinks == (1.0, 0.9, 0.8, 0.7, 0.6, 0.5) and imatrix_search(tuned).norm == 2


@pytest.mark.parametrize("name", ["int4-group-sym", "int4-group-asym", "int8-channel-sym", "int8-tensor-asym"])
@pytest.mark.parametrize("seed", range(4))
def test_imatrix_mse_never_worse_than_minmax_in_weighted_error(name: str, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(32, 128, generator=gen) * torch.rand(128, generator=gen)
    w[:, torch.randint(0, 128, (5,), generator=gen)] *= 10
    importance = torch.rand(128, generator=gen) ** 3
    args = ARGS[name]

    def weighted_error(qp) -> torch.Tensor:  # per group: sum of E[x^2] * |error|^3, the observer's objective
        err = (dequantize(quantize(w, qp, args), qp, args) - w).abs().pow(3) * importance
        if args.strategy == "group":
            return err.reshape(32, -1, args.group_size).sum(-1)
        return err.sum(-1) if args.strategy == "channel" else err.sum()

    ours, minmax = imatrix_mse_qparams(w, args, w.dtype, importance), minmax_qparams(w, args, w.dtype)
    assert torch.all(weighted_error(ours) <= weighted_error(minmax) * (1 + 1e-6))
    if args.num_bits == 4:  # 8 bits rarely gain from a 5% step of clipping; 4 bits with outliers do
        assert weighted_error(ours).sum() < weighted_error(minmax).sum()


@pytest.mark.parametrize("seed", range(4))
def test_separate_ends_never_worse_than_the_joint_shrink_and_better_with_a_one_sided_outlier(seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(32, 128, generator=gen)
    w[:, 5] = 9.0  # every row's first group has one large positive weight, nothing as far below
    importance = torch.rand(128, generator=gen) ** 2
    args = ARGS["int4-group-asym"]
    apart = QuantizationArgs(**{**args.model_dump(), "observer_kwargs": {"separate_ends": True}})

    def weighted_error(qp) -> torch.Tensor:
        err = (dequantize(quantize(w, qp, args), qp, args) - w).abs().pow(3) * importance
        return err.reshape(32, -1, args.group_size).sum(-1)

    joint = imatrix_mse_qparams(w, args, w.dtype, importance)
    separate = imatrix_mse_qparams(w, apart, w.dtype, importance)
    assert imatrix_search(apart).separate_ends and not imatrix_search(args).separate_ends
    assert torch.all(weighted_error(separate) <= weighted_error(joint) * (1 + 1e-6))
    assert weighted_error(separate)[:, 0].sum() < weighted_error(joint)[:, 0].sum() * 0.985
    symmetric = ARGS["int4-group-sym"]
    both = QuantizationArgs(**{**symmetric.model_dump(), "observer_kwargs": {"separate_ends": True}})
    assert torch.equal(imatrix_mse_qparams(w, both, w.dtype, importance).scale, imatrix_mse_qparams(w, symmetric, w.dtype, importance).scale)


def test_imatrix_mse_needs_data() -> None:
    with pytest.raises(ModelPressError, match="imatrix_mse: needs calibration data"):
        imatrix_mse_qparams(torch.randn(4, 32), ARGS["int4-group-sym"], torch.float32)
