"""Orthogonal rotations fused into the weights (SpinQuant's R1 and R2, QuaRot's Hadamards).

For an orthogonal Q, rotating the residual stream h -> h Q changes nothing the model computes, as
long as every module that reads the stream reads it through Q^T and every module that writes to it
writes through Q:

    a Linear reading the (normalized) stream:    W -> W Q          (its input columns)
    a Linear adding to the stream:               W -> Q^T W, b -> Q^T b   (its output rows)
    the embeddings (one row per token):          E -> E Q

An RMS norm commutes with Q only once its weight is 1 (||h Q|| = ||h||, but diag(w) Q != Q diag(w)),
so each norm's weight is first folded into the Linears it feeds (W -> W diag(w)), which is exact.

Inside attention the value and output projections of each head form a pair: a head's values v_h
rotated by R (v_h -> v_h R, i.e. W_v's rows of that head -> R^T W_v[h]) and o's input columns of
that head rotated by R (W_o[:, h] -> W_o[:, h] R) cancel, since attention mixes values over tokens
only. That is R2, one head_dim x head_dim matrix shared by every head.

A rotation spreads each weight row's outliers over all its columns, so the groups a 4-bit
quantizer sees are flatter. All matrices are built and applied in float64 and cast back.

A rotation is stored as square blocks on its diagonal: (blocks, size, size). A Hadamard block
exists for powers of two; a width that is not one (SmolLM2's 576 = 9 x 64) takes a block size that
divides it.
"""

import math
from dataclasses import dataclass

import torch

from modelpress.engine.errors import ModelPressError
from modelpress.engine.smoothing import has_unit_offset

CHUNK = 8192  # rows rotated at once


@dataclass(frozen=True)
class Rotation:
    """A block-diagonal orthogonal matrix, as its diagonal blocks in float64."""

    blocks: torch.Tensor  # (count, size, size)

    @property
    def width(self) -> int:
        return self.blocks.shape[0] * self.blocks.shape[1]

    def dense(self) -> torch.Tensor:
        return torch.block_diag(*self.blocks)


def hadamard(size: int) -> torch.Tensor:
    """The normalized Sylvester Hadamard matrix of a power-of-two size (orthogonal, entries +-1/sqrt(size))."""
    if size < 1 or size & (size - 1):
        raise ValueError(f"a Hadamard matrix needs a power-of-two size, not {size}")
    h = torch.ones(1, 1, dtype=torch.float64)
    while h.shape[0] < size:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return h / math.sqrt(size)


def random_orthogonal(size: int, generator: torch.Generator) -> torch.Tensor:
    """A Haar-random orthogonal matrix: QR of a Gaussian, with the signs of R's diagonal moved into Q."""
    q, r = torch.linalg.qr(torch.randn(size, size, dtype=torch.float64, generator=generator))
    return q * torch.sign(torch.diagonal(r))[None, :]


def build_rotation(width: int, block: int, kind: str, seed: int) -> Rotation:
    """A `width`-wide block-diagonal rotation of `kind` with blocks of `block`.

    hadamard: the same Hadamard block throughout; random-hadamard (and the start of a learned
    rotation): each row of it times a random sign; random-matrix: an independent random orthogonal block each.
    """
    if width % block:
        raise ValueError(f"block {block} does not divide width {width}")
    count = width // block
    generator = torch.Generator().manual_seed(seed)
    if kind == "random-matrix":
        return Rotation(torch.stack([random_orthogonal(block, generator) for _ in range(count)]))
    h = hadamard(block).expand(count, block, block)
    if kind == "hadamard":
        return Rotation(h.clone())
    signs = torch.randint(0, 2, (count, block, 1), generator=generator, dtype=torch.float64) * 2 - 1
    return Rotation(signs * h)


def rotate_columns(w: torch.Tensor, rotation: Rotation) -> torch.Tensor:
    """W Q: the last dimension (a Linear's input columns, an embedding row) rotated, CHUNK rows at a
    time so that a large vocabulary's float64 copy never exists whole."""
    count, size, _ = rotation.blocks.shape
    blocks = rotation.blocks.to(w.device)
    rows = w.reshape(-1, w.shape[-1])
    out = torch.empty_like(rows)
    for start in range(0, rows.shape[0], CHUNK):
        x = rows[start : start + CHUNK].to(torch.float64).reshape(-1, count, size)
        out[start : start + CHUNK] = torch.einsum("rki,kij->rkj", x, blocks).reshape(x.shape[0], -1).to(w.dtype)
    return out.reshape(w.shape)


def rotate_rows(w: torch.Tensor, rotation: Rotation) -> torch.Tensor:
    """Q^T W: the first dimension (a Linear's output rows, or a bias) rotated."""
    count, size, _ = rotation.blocks.shape
    x = w.to(torch.float64).reshape(count, size, *w.shape[1:])
    return torch.einsum("kij,ki...->kj...", rotation.blocks.to(w.device), x).reshape(w.shape).to(w.dtype)


def per_head(rotation: Rotation, heads: int) -> Rotation:
    """One head's rotation repeated over `heads` heads side by side."""
    return Rotation(rotation.blocks.repeat(heads, 1, 1))


def fold_norm(norm: torch.nn.Module, readers: list[torch.nn.Module]) -> None:
    """Move the norm's per-channel weight into the input columns of the modules reading its output,
    leaving a norm that only normalizes (w = 1, or w = 0 for a (1 + w) norm)."""
    if isinstance(getattr(norm, "bias", None), torch.Tensor):
        raise ModelPressError(f"SpinQuantModifier: {type(norm).__name__} has a bias (a LayerNorm?); only RMS norms can be rotated through")
    offset = has_unit_offset(norm)
    w = norm.weight.data.to(torch.float64)
    scale = 1 + w if offset else w
    for module in readers:
        module.weight.data = (module.weight.data.to(torch.float64) * scale.to(module.weight.device)[None, :]).to(module.weight.dtype)
    norm.weight.data = torch.zeros_like(norm.weight.data) if offset else torch.ones_like(norm.weight.data)


@torch.no_grad()
def commutes(norm: torch.nn.Module, rotation: Rotation) -> bool:
    """Whether norm(h Q) = norm(h) Q for this (folded) norm: true of RMS norms, not of LayerNorm."""
    generator = torch.Generator().manual_seed(0)
    dtype, device = norm.weight.dtype, norm.weight.device
    h = torch.randn(3, rotation.width, generator=generator, dtype=torch.float64).to(device, dtype)
    lhs, rhs = norm(rotate_columns(h, rotation)).double(), rotate_columns(norm(h), rotation).double()
    tolerance = 1e-6 if dtype == torch.float64 else 1e-2
    return bool((lhs - rhs).abs().amax() <= tolerance * rhs.abs().amax().clamp(min=1))


def rotate_reader(linear: torch.nn.Module, rotation: Rotation) -> None:
    """A module that reads the rotated stream: W -> W Q."""
    linear.weight.data = rotate_columns(linear.weight.data, rotation)


def rotate_writer(linear: torch.nn.Linear, rotation: Rotation) -> None:
    """A Linear that adds to the rotated stream: W -> Q^T W, b -> Q^T b."""
    linear.weight.data = rotate_rows(linear.weight.data, rotation)
    if linear.bias is not None:
        linear.bias.data = rotate_rows(linear.bias.data, rotation)


def rotate_values(v: torch.nn.Linear, rows: tuple[int, int], o: torch.nn.Linear, head: Rotation, head_dim: int) -> None:
    """R2: rotate each value head's rows (rows lo:hi of v, a fused qkv's last ones) and the columns
    of o that read it, by the same per-head rotation."""
    lo, hi = rows
    values = per_head(head, (hi - lo) // head_dim)
    w = v.weight.data
    w[lo:hi] = rotate_rows(w[lo:hi], values)
    if v.bias is not None:
        v.bias.data[lo:hi] = rotate_rows(v.bias.data[lo:hi], values)
    o.weight.data = rotate_columns(o.weight.data, per_head(head, o.in_features // head_dim))
