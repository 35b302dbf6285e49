"""True-sequential compression of a pre-norm decoder layer, computing every part once.

A pre-norm layer (Llama, Qwen2/3, Mistral, Gemma, Phi-3 ...) runs

    h = x + [post_attn_norm](o_proj(attention(attn_norm(x))))
    y = h + [post_mlp_norm](down_proj(mlp_inner(mlp_norm(h))))

so its Linears fall into four groups with one input each: the attention's input projections read
attn_norm(x), o_proj reads the attention's output, the MLP's input projections read mlp_norm(h),
and down_proj reads the MLP's inner activation. Each group is compressed as soon as its input is
known for every calibration sample, and the next input is computed with the group already
compressed: GPTQ's "true sequential" order, one forward of each part, one Hessian per group.

The split is checked against the layer's own forward on one sample before it is used; a layer it
does not reproduce goes through the generic calibrate-then-propagate path instead.

GPTQ aimed at the float model (`float_target`) needs each group's input in the float model too: a
float copy of the layer runs the same parts beside the compressed one, on a second stream of hidden
states, and hands each group's float input with its compressed one.
"""

from dataclasses import dataclass
from typing import Any, Callable, Iterable, Iterator

import torch

from modelpress.engine.activations import Rows, Storage
from modelpress.engine.weights import trim_heap

LayerInput = tuple[tuple[Any, ...], dict[str, Any]]  # a decoder layer's (args, kwargs) for one sample


# compress the named Linears given their input over all calibration tokens (and the float model's
# input to them, when it is carried): changes made to the input (smoothing divides it, through
# Rows.update) are what the next part reads
GroupCompressor = Callable[[list[str], Rows, Rows | None], None]

# tokens per call of a token-wise part and per X^T X product: the products are as fast per
# token as with 16384
TOKEN_CHUNK = 4096
# tokens per call of the MLP: its gate, up and product temporaries ([chunk, intermediate] each)
# are a layer's widest tensors, and GEMMs of 1024 rows run as fast per token as of 4096
MLP_CHUNK = 1024
# tokens per chunk of a norm output that is dropped piece by piece: from 512 features up, such a
# chunk is above glibc's largest mmap threshold (32 MiB), so it is a mapping of its own whose
# memory goes back to the system when dropped, not into a heap hole that still counts as resident
DROPPED_CHUNK = 16384


@dataclass
class PreNormParts:
    attn_norm: torch.nn.Module
    attn: torch.nn.Module
    o_proj: torch.nn.Linear
    post_attn_norm: torch.nn.Module | None
    mlp_norm: torch.nn.Module
    mlp: torch.nn.Module
    down_proj: torch.nn.Linear
    post_mlp_norm: torch.nn.Module | None
    groups: list[list[str]]  # Linear names relative to the layer, in the order they are compressed


class _Tapped(Exception):
    """Raised by a tap once it has the input it waits for: the rest of the forward is not needed."""


def find_parts(layer: torch.nn.Module) -> PreNormParts | None:
    """The layer's parts by their usual names, or None when it is not laid out that way."""
    attn, mlp = getattr(layer, "self_attn", None), getattr(layer, "mlp", None)
    o_proj, down = getattr(attn, "o_proj", None), getattr(mlp, "down_proj", None)
    attn_norm = getattr(layer, "input_layernorm", None)
    if not all(isinstance(m, torch.nn.Module) for m in (attn, mlp, attn_norm)):
        return None
    if not isinstance(o_proj, torch.nn.Linear) or not isinstance(down, torch.nn.Linear):
        return None
    if hasattr(layer, "pre_feedforward_layernorm"):  # Gemma 2/3: norms after attention and MLP too
        post_attn, mlp_norm = layer.post_attention_layernorm, layer.pre_feedforward_layernorm
        post_mlp = getattr(layer, "post_feedforward_layernorm", None)
    else:
        post_attn, mlp_norm, post_mlp = None, getattr(layer, "post_attention_layernorm", None), None
    if mlp_norm is None:
        return None
    names = {id(m): n for n, m in layer.named_modules()}
    attn_in = [names[id(m)] for m in attn.modules() if isinstance(m, torch.nn.Linear) and m is not o_proj]
    mlp_in = [names[id(m)] for m in mlp.modules() if isinstance(m, torch.nn.Linear) and m is not down]
    groups = [attn_in, [names[id(o_proj)]], mlp_in, [names[id(down)]]]
    linears = {n for n, m in layer.named_modules() if isinstance(m, torch.nn.Linear)}
    if linears != {n for g in groups for n in g}:  # a Linear outside attention and MLP: unknown layout
        return None
    return PreNormParts(attn_norm, attn, o_proj, post_attn, mlp_norm, mlp, down, post_mlp, groups)


def _tap(parts_module: torch.nn.Module, target: torch.nn.Linear, *args: Any, **kwargs: Any) -> torch.Tensor:
    """Run `parts_module` until it calls `target`; return the input `target` was given."""
    seen: list[torch.Tensor] = []

    def hook(_m: torch.nn.Module, inputs: tuple) -> None:
        seen.append(inputs[0])
        raise _Tapped

    handle = target.register_forward_pre_hook(hook)
    try:
        parts_module(*args, **kwargs)
    except _Tapped:
        pass
    finally:
        handle.remove()
    if not seen:
        raise RuntimeError(f"{type(parts_module).__name__} never called {type(target).__name__}")
    return seen[0]


def _attention_inner(parts: PreNormParts, normed: torch.Tensor, kwargs: dict[str, Any]) -> torch.Tensor:
    return _tap(parts.attn, parts.o_proj, hidden_states=normed, **kwargs)


def _mlp_inner(parts: PreNormParts, normed: torch.Tensor) -> torch.Tensor:
    return _tap(parts.mlp, parts.down_proj, normed)


def _post(post_norm: torch.nn.Module | None, out: torch.Tensor) -> torch.Tensor:
    return post_norm(out) if post_norm is not None else out


@torch.no_grad()
def reproduces_layer(layer: torch.nn.Module, parts: PreNormParts, sample: LayerInput) -> bool:
    """Whether the split computes what the layer computes on `sample`, with every Linear of an
    input group reading exactly that group's input."""
    args, kwargs = sample
    reads: dict[str, torch.Tensor] = {}
    handles = [
        layer.get_submodule(n).register_forward_pre_hook(lambda _m, a, n=n: reads.__setitem__(n, a[0]))
        for n in parts.groups[0] + parts.groups[2]
    ]
    try:
        out = layer(*args, **kwargs)
        expected = out[0] if isinstance(out, tuple) else out
        x = args[0]
        n1 = parts.attn_norm(x)
        h = x + _post(parts.post_attn_norm, parts.o_proj(_attention_inner(parts, n1, kwargs)))
        n2 = parts.mlp_norm(h)
        y = h + _post(parts.post_mlp_norm, parts.down_proj(_mlp_inner(parts, n2)))
    except Exception:  # any layer the split cannot drive is simply not split
        return False
    finally:
        for handle in handles:
            handle.remove()
    same_inputs = all(n in reads and torch.equal(reads[n], n1 if n in parts.groups[0] else n2) for n in reads)
    complete = len(reads) == len(parts.groups[0]) + len(parts.groups[2])
    return complete and same_inputs and torch.allclose(y, expected, rtol=1e-4, atol=1e-5)


@dataclass
class Calibration:
    """Every calibration sample's input to the current decoder layer: all samples' hidden states
    as one [tokens, hidden] `Rows` (sample i is rows bounds[i]..bounds[i+1]), and each sample's
    other arguments (position tensors, masks), which stay the same from layer to layer."""

    hidden: Rows
    bounds: list[int]
    rest: list[LayerInput]  # each sample's (arguments after the hidden states, keyword arguments)
    float_hidden: Rows | None = None  # the same tokens' input to the float model's layer, when carried

    def __len__(self) -> int:
        return len(self.rest)

    def sample(self, i: int) -> LayerInput:
        """Sample i's call arguments: a view of the hidden states where they are in memory as computed."""
        args, kwargs = self.rest[i]
        lo, hi = self.bounds[i], self.bounds[i + 1]
        return (self.hidden.read(lo, hi).view(1, hi - lo, -1), *args), kwargs


def _per_token(fn: Callable[[torch.Tensor], torch.Tensor], chunks: Iterable[torch.Tensor]) -> Iterator[torch.Tensor]:
    """A token-wise part (norm, MLP) chunk by chunk, so that its temporaries stay small."""
    for chunk in chunks:
        yield fn(chunk.unsqueeze(0))[0]


def collect(chunks: Iterator[torch.Tensor], tokens: int, storage: Storage, piece: int, separate: bool = False) -> Rows:
    """New Rows of `storage` in pieces of `piece` rows, filled from `chunks` in order."""
    out = None
    start = 0
    for y in chunks:
        out = out if out is not None else storage.rows(tokens, y.shape[-1], y.dtype, piece, separate)
        out.write(start, y)
        start += y.shape[0]
    assert out is not None, "no calibration tokens"
    return out


def _blocks(rows: Rows, size: int) -> Iterator[torch.Tensor]:
    """Rows in blocks of `size` (a multiple of the pieces' size), each read as it is reached."""
    for start in range(0, rows.tokens, size):
        yield rows.read(start, min(start + size, rows.tokens))


def _consume(rows: Rows, size: int) -> Iterator[torch.Tensor]:
    """The rows in chunks of `size`, each of their pieces released once all read."""
    for piece in rows.drain():
        yield from piece.split(size)


def _add_residual(hidden: Rows, inner: Rows, out: Callable[[torch.Tensor], torch.Tensor]) -> None:
    """hidden += out(inner), piece by piece."""
    hidden.update(lambda rows, x: rows.add_(out(x)), inner)


@torch.no_grad()
def compress_sequential(
    parts: PreNormParts,
    calibration: Calibration,
    compress_group: GroupCompressor,
    last: bool,
    storage: Storage,
    float_parts: PreNormParts | None = None,
) -> None:
    """Compress the layer group by group; the calibration's hidden states become the layer's
    outputs, in place (and its float hidden states the float layer's, with `float_parts`).

    Token-wise parts (norms, projections, MLP) run over all samples' tokens in chunks; only
    attention runs sample by sample. Each part runs once: a norm's output is kept until the
    group that reads it is compressed and the next part has read it too. The MLP's norm output
    is dropped piece by piece as the MLP's inner activation (the widest tensor) is built, so it
    never adds to the peak. The last layer's outputs are not computed. Every activation kept for
    all tokens is made by `storage` (activations.py).
    """
    bounds, tokens = calibration.bounds, calibration.hidden.tokens
    streams = [(parts, calibration.hidden)]
    if float_parts is not None:
        assert calibration.float_hidden is not None, "a float layer needs the float hidden states"
        streams.append((float_parts, calibration.float_hidden))

    def each(make: Callable[[PreNormParts, Rows], Rows]) -> list[Rows]:
        return [make(p, hidden) for p, hidden in streams]

    def compress(group: int, inputs: list[Rows]) -> None:
        compress_group(parts.groups[group], inputs[0], inputs[1] if len(inputs) > 1 else None)

    def close(rows: list[Rows]) -> None:
        for r in rows:
            r.close()

    normed = each(lambda p, hidden: collect(_per_token(p.attn_norm, hidden.chunks()), tokens, storage, TOKEN_CHUNK))
    compress(0, normed)
    inner = [
        collect(
            (
                _attention_inner(p, n.read(bounds[i], bounds[i + 1]).unsqueeze(0), kwargs)[0]
                for i, (_, kwargs) in enumerate(calibration.rest)
            ),
            tokens,
            storage,
            TOKEN_CHUNK,
        )
        for (p, _), n in zip(streams, normed)
    ]
    close(normed)
    del normed
    compress(1, inner)
    for (p, hidden), x in zip(streams, inner):
        _add_residual(hidden, x, lambda x, p=p: _post(p.post_attn_norm, p.o_proj(x)))
    close(inner)
    del inner
    trim_heap()  # what attention left on the heap, before the MLP's wider activations

    normed = each(
        lambda p, hidden: collect(_per_token(p.mlp_norm, _blocks(hidden, DROPPED_CHUNK)), tokens, storage, DROPPED_CHUNK, separate=True)
    )
    compress(2, normed)
    # one buffer rather than separate pieces: the pieces would interleave with the MLP's
    # temporaries on the heap, which then grows by twice the activation
    inner = [
        collect(_per_token(lambda x, p=p: _mlp_inner(p, x), _consume(n, MLP_CHUNK)), tokens, storage, TOKEN_CHUNK)
        for (p, _), n in zip(streams, normed)
    ]
    close(normed)
    compress(3, inner)
    if not last:
        for (p, hidden), x in zip(streams, inner):
            _add_residual(hidden, x, lambda x, p=p: _post(p.post_mlp_norm, p.down_proj(x)))
    close(inner)
