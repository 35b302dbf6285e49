"""bench/float_target_probe.py: the shifted target is the least-squares fit to the float output, and the probe's model is on the int4 grid."""

import sys
from pathlib import Path

import torch
from compressed_tensors.quantization import QuantizationArgs

from support.models import REPO

sys.path.insert(0, str(REPO / "bench"))
import float_target_probe  # noqa: E402


def test_the_shifted_weight_fits_the_float_output_best() -> None:
    torch.manual_seed(0)
    w = torch.randn(8, 16, dtype=torch.float64)
    xf = torch.randn(400, 16, dtype=torch.float64)
    # the input the quantized layers before it produce: here a linear distortion of the float one,
    # which a shifted weight can undo exactly
    xq = xf @ (torch.eye(16, dtype=torch.float64) + 0.1 * torch.randn(16, 16, dtype=torch.float64))
    h, c = xq.T @ xq, (xf - xq).T @ xq
    best = float_target_probe.float_target(w, h, c, 1.0, damp=1e-12)

    def error(v: torch.Tensor) -> float:
        return float(((xq @ v.T - xf @ w.T) ** 2).sum())

    assert error(best) < 1e-12 * error(w)
    for _ in range(5):  # a least-squares minimum: every nearby weight does worse
        assert error(best + 1e-3 * torch.randn_like(w)) > error(best)
    assert torch.equal(float_target_probe.float_target(w, h, c, 0.0), w)


def test_the_probe_leaves_every_linear_on_a_4_bit_grid_per_group(llama_dir: Path) -> None:
    windows = torch.randint(3, 300, (8, 32))
    scheme = QuantizationArgs(num_bits=4, type="int", symmetric=False, strategy="group", group_size=64)
    model = float_target_probe.run(llama_dir, windows, 0.5, scheme)
    for layer in model.model.layers:
        for linear in (m for m in layer.modules() if isinstance(m, torch.nn.Linear)):
            groups = linear.weight.reshape(linear.out_features, -1, 64)
            assert max(len(torch.unique(g)) for row in groups for g in row) <= 16
