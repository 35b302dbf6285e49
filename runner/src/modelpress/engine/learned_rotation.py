"""A data-free learned R1: the orthogonal Q that makes the weights quantize best, before any calibration.

Every Linear that reads the residual stream becomes W Q and every one that writes to it Q^T W, so
Q decides how far each weight group lands from the quantizer's grid. Starting from a random
Hadamard rotation, a few hundred Cayley steps on the orthogonal group lower the relative
quantization error, summed over the layers,

    sum_W ||W' - fq(W')||^2 / ||W||^2,   W' = W Q (readers) or Q^T W (writers),

with fq the quantizer of the recipe (its bits, group size and symmetry; the grid point of each
weight held fixed, the scale and zero point following the group's range). The Cayley step
Q <- (I + a/2 A)^-1 (I - a/2 A) Q, with A = G Q^T - Q G^T skew, stays exactly orthogonal.

Only a sample of the weights takes part (rows of the readers, column groups of the writers; the
error of either splits over them): it is read tensor by tensor, so memory holds the sample, never
the model. The sample and the steps follow `seed`, so a seed gives the same rotation every time.
"""

import math
from collections.abc import Callable

import torch
from compressed_tensors.quantization import QuantizationArgs, QuantizationStrategy

from modelpress.engine.errors import ModelPressError
from modelpress.engine.mappings import RotationLayout
from modelpress.engine.modifier import Plan
from modelpress.engine.rotation import Rotation

READER_ROWS = 16  # rows sampled from each reading Linear
WRITER_GROUPS = 1  # column groups sampled from each writing Linear
MOMENTUM = 0.9
FIRST_ANGLE = 0.05  # the first step's size, ||a A||_F, decaying to zero along a cosine


def quantizer_args(plan: Plan | None) -> QuantizationArgs:
    """The weight quantizer a learned rotation fits: that of the first module the next quantizer targets."""
    weights = next((t.scheme.weights for t in plan.values() if t.scheme.weights is not None), None) if plan is not None else None
    if weights is None or weights.type != "int":
        raise ModelPressError(
            "SpinQuantModifier.transform_type: learned fits R1 to an integer weight quantizer, and none follows it; "
            "put a QuantizationModifier or GPTQModifier with int weights after it, or use hadamard"
        )
    return weights


def sample_weights(
    layouts: list[RotationLayout], read: Callable[[str], torch.Tensor], offset_norms: bool, group: int, seed: int
) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Sampled rows of every reader (its norm folded in), and sampled column groups of every writer
    as (columns, hidden) so that both rotate by a right product."""
    generator = torch.Generator().manual_seed(seed)
    readers, writers = [], []
    for layout in layouts:
        scale = {}
        for fold in layout.norms:
            w = read(f"{fold.norm}.weight").float()
            scale.update({n: 1 + w if offset_norms else w for n in fold.linears})
        for name in layout.readers:
            w = read(f"{name}.weight").float() * scale.get(name, 1)
            rows = torch.randperm(w.shape[0], generator=generator)[:READER_ROWS]
            readers.append(w[rows])
        for name in layout.writers:
            w = read(f"{name}.weight").float()
            size = min(group, w.shape[1])
            starts = torch.randperm(w.shape[1] // size, generator=generator)[:WRITER_GROUPS] * size
            writers += [w[:, s : s + size].T.contiguous() for s in starts.tolist()]
    return readers, writers


def fake_quant_error(x: torch.Tensor, args: QuantizationArgs, group: int) -> torch.Tensor:
    """||x - fq(x)||^2 over groups of `group` along the last dimension, differentiable through the
    scales (the codes held fixed)."""
    g = x.reshape(*x.shape[:-1], x.shape[-1] // group, group)
    levels = 2**args.num_bits
    if args.symmetric:
        scale = g.abs().amax(-1, keepdim=True).clamp(min=1e-12) / ((levels - 1) / 2)
        q = torch.clamp(torch.round(g / scale), -levels // 2, levels // 2 - 1).detach()
        return ((g - q * scale) ** 2).sum()
    lo = g.amin(-1, keepdim=True).clamp(max=0)
    hi = g.amax(-1, keepdim=True).clamp(min=0)
    scale = ((hi - lo) / (levels - 1)).clamp(min=1e-12)
    zero = torch.round(-lo / scale).detach()
    q = torch.clamp(torch.round(g / scale) + zero, 0, levels - 1).detach()
    return ((g - (q - zero) * scale) ** 2).sum()


def objective(q: torch.Tensor, readers: torch.Tensor, writers: torch.Tensor, args: QuantizationArgs, group: int,
              reader_norm: torch.Tensor, writer_norm: torch.Tensor) -> torch.Tensor:
    """The relative quantization error of the sample under rotation q (each matrix's rows weighted by its norm)."""
    err_r = fake_quant_error(readers @ q, args, group) if readers.numel() else q.new_zeros(())
    err_w = fake_quant_error(writers @ q, args, group) if writers.numel() else q.new_zeros(())
    return err_r / reader_norm + err_w / writer_norm


def learn_rotation(
    start: Rotation,
    layouts: list[RotationLayout],
    read: Callable[[str], torch.Tensor],
    args: QuantizationArgs,
    steps: int,
    seed: int,
    offset_norms: bool = False,
) -> Rotation:
    """R1 refined from `start` by `steps` Cayley steps; the best rotation seen (`start` included)."""
    width = start.width
    group = args.group_size if args.strategy == QuantizationStrategy.GROUP and args.group_size else width
    readers_list, writers_list = sample_weights(layouts, read, offset_norms, group, seed)
    readers = torch.cat(readers_list) if readers_list else torch.zeros(0, width)
    writers = torch.cat(writers_list) if writers_list else torch.zeros(0, width)
    reader_norm = readers.pow(2).sum().clamp(min=1e-12)
    writer_norm = writers.pow(2).sum().clamp(min=1e-12)
    q = start.dense().float()
    eye = torch.eye(width)
    momentum = torch.zeros_like(q)
    best, best_loss = q.clone(), math.inf
    for step in range(steps + 1):
        q.requires_grad_(True)
        loss = objective(q, readers, writers, args, group, reader_norm, writer_norm)
        (grad,) = torch.autograd.grad(loss, q)
        q = q.detach()
        if loss.item() < best_loss:
            best, best_loss = q.clone(), loss.item()
        if step == steps:
            break
        momentum = MOMENTUM * momentum + grad
        a = momentum @ q.T - q @ momentum.T
        angle = FIRST_ANGLE * 0.5 * (1 + math.cos(math.pi * step / steps))
        alpha = angle / a.norm().clamp(min=1e-12)
        q = torch.linalg.solve(eye + alpha / 2 * a, (eye - alpha / 2 * a) @ q)
    # re-orthogonalize in float64: float32 steps drift from orthogonality by ~1e-6
    u, _, vh = torch.linalg.svd(best.double())
    return Rotation((u @ vh)[None])
