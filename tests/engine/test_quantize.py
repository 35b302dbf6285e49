"""Round-to-nearest math against compressed-tensors' conventions and its own quantizer."""

import pytest
import torch
from compressed_tensors.compressors.pack_quantized.helpers import unpack_from_int32
from compressed_tensors.quantization import QuantizationArgs
from compressed_tensors.quantization.lifecycle.forward import fake_quantize

from modelpress.engine.checkpoint_writer import compressed_tensors_of
from modelpress.engine.quantize import (
    QuantizedLinear,
    dequantize,
    minmax_qparams,
    mse_qparams,
    qparams_from_range,
    quantize,
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
