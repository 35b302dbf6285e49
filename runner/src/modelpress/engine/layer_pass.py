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
"""

from dataclasses import dataclass
from typing import Any, Callable, Iterator

import torch

from modelpress.engine.weights import trim_heap

LayerInput = tuple[tuple[Any, ...], dict[str, Any]]  # a decoder layer's (args, kwargs) for one sample


@dataclass
class GroupInput:
    """A Linear group's input over all calibration tokens, as [tokens, features] chunks of kept
    tensors: changes made in place (smoothing divides them) are what the next part reads."""

    chunks: Callable[[], Iterator[torch.Tensor]]  # re-iterable


GroupCompressor = Callable[[list[str], GroupInput], None]  # compress the named Linears given their input

# tokens per call of a token-wise part and per X^T X product: bounds the MLP's temporaries,
# and the products are as fast per token as with 16384
TOKEN_CHUNK = 4096
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


def _token_rows(inputs: list[LayerInput]) -> torch.Tensor:
    """Every sample's hidden states as one [tokens, hidden] matrix, and the samples as views of it.

    The previous layer leaves its outputs that way, so only the first layer copies.
    """
    hidden = [args[0] for args, _ in inputs]
    base = hidden[0]._base
    offset, reuse = 0, base is not None and base.dim() == 2
    for h in hidden:
        reuse = reuse and h._base is base and h.data_ptr() == base.data_ptr() + offset * base.stride(0) * base.element_size()
        offset += h.shape[-2]
    rows = base if reuse and offset == base.shape[0] else torch.cat([h.reshape(-1, h.shape[-1]) for h in hidden])
    _as_views(inputs, rows)
    return rows


def _as_views(inputs: list[LayerInput], rows: torch.Tensor) -> None:
    offset = 0
    for i, (args, kwargs) in enumerate(inputs):
        length = args[0].shape[-2]
        inputs[i] = ((rows[offset : offset + length].view(1, length, -1), *args[1:]), kwargs)
        offset += length


def _chunks(rows: torch.Tensor, size: int = TOKEN_CHUNK) -> Iterator[torch.Tensor]:
    yield from rows.split(size)


def _per_token(fn: Callable[[torch.Tensor], torch.Tensor], chunks: Iterator[torch.Tensor]) -> Iterator[torch.Tensor]:
    """A token-wise part (norm, MLP) chunk by chunk, so that its temporaries stay small."""
    for chunk in chunks:
        yield fn(chunk.unsqueeze(0))[0]


def _collect(chunks: Iterator[torch.Tensor], tokens: int) -> torch.Tensor:
    out = None
    start = 0
    for y in chunks:
        out = out if out is not None else y.new_empty(tokens, y.shape[-1])
        out[start : start + y.shape[0]] = y
        start += y.shape[0]
    return out


def _consume(chunks: list[torch.Tensor]) -> Iterator[torch.Tensor]:
    """The chunks in TOKEN_CHUNK pieces, each chunk dropped from the list once all read."""
    while chunks:
        yield from _chunks(chunks[0])
        del chunks[0]


def _add_residual(hidden: torch.Tensor, inner: torch.Tensor, out: Callable[[torch.Tensor], torch.Tensor]) -> None:
    """hidden += out(inner), chunk by chunk. A function of its own so that no loop variable
    outlives it: a last chunk left in the caller's frame would keep all of `inner` alive."""
    for rows, x in zip(_chunks(hidden), _chunks(inner)):
        rows += out(x)


@torch.no_grad()
def compress_sequential(
    parts: PreNormParts,
    inputs: list[LayerInput],
    compress_group: GroupCompressor,
    last: bool,
) -> None:
    """Compress the layer group by group; `inputs` become the layer's outputs, in place.

    Token-wise parts (norms, projections, MLP) run over all samples' tokens in chunks; only
    attention runs sample by sample. Each part runs once: a norm's output is kept until the
    group that reads it is compressed and the next part has read it too. The MLP's norm output
    is dropped chunk by chunk as the MLP's inner activation (the widest tensor) is built, so it
    never adds to the peak. The last layer's outputs are not computed.
    """
    hidden = _token_rows(inputs)
    bounds = [0]
    for args, _ in inputs:
        bounds.append(bounds[-1] + args[0].shape[-2])

    normed = _collect(_per_token(parts.attn_norm, _chunks(hidden)), hidden.shape[0])
    compress_group(parts.groups[0], GroupInput(lambda: _chunks(normed)))
    inner = _collect(
        (
            _attention_inner(parts, normed[bounds[i] : bounds[i + 1]].unsqueeze(0), kwargs)[0]
            for i, (_, kwargs) in enumerate(inputs)
        ),
        hidden.shape[0],
    )
    del normed
    compress_group(parts.groups[1], GroupInput(lambda: _chunks(inner)))
    _add_residual(hidden, inner, lambda x: _post(parts.post_attn_norm, parts.o_proj(x)))
    del inner
    trim_heap()  # what attention left on the heap, before the MLP's wider activations

    normed_chunks = list(_per_token(parts.mlp_norm, _chunks(hidden, DROPPED_CHUNK)))
    compress_group(parts.groups[2], GroupInput(lambda: iter(normed_chunks)))
    # one buffer rather than a list of chunks: the chunks would interleave with the MLP's
    # temporaries on the heap, which then grows by twice the activation
    inner = _collect(_per_token(lambda x: _mlp_inner(parts, x), _consume(normed_chunks)), hidden.shape[0])
    compress_group(parts.groups[3], GroupInput(lambda: _chunks(inner)))
    if not last:
        _add_residual(hidden, inner, lambda x: _post(parts.post_mlp_norm, parts.down_proj(x)))
