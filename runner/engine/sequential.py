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
from typing import Any, Callable

import torch

from modelpress.runner.engine.calibration import ActivationStats

LayerInput = tuple[tuple[Any, ...], dict[str, Any]]  # a decoder layer's (args, kwargs) for one sample
GroupCompressor = Callable[[list[str], list[torch.Tensor]], None]  # (Linear names, their inputs)

HESSIAN_CHUNK_TOKENS = 16384  # tokens per X^T X product: large enough for BLAS, small next to X


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


def _residual(h: torch.Tensor, out: torch.Tensor, post_norm: torch.nn.Module | None) -> torch.Tensor:
    return h + (post_norm(out) if post_norm is not None else out)


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
        h = _residual(x, parts.o_proj(_attention_inner(parts, n1, kwargs)), parts.post_attn_norm)
        n2 = parts.mlp_norm(h)
        y = _residual(h, parts.down_proj(_mlp_inner(parts, n2)), parts.post_mlp_norm)
    except Exception:  # any layer the split cannot drive is simply not split
        return False
    finally:
        for handle in handles:
            handle.remove()
    same_inputs = all(n in reads and torch.equal(reads[n], n1 if n in parts.groups[0] else n2) for n in reads)
    complete = len(reads) == len(parts.groups[0]) + len(parts.groups[2])
    return complete and same_inputs and torch.allclose(y, expected, rtol=1e-4, atol=1e-5)


def group_stats(xs: list[torch.Tensor], with_hessian: bool) -> ActivationStats:
    """Statistics of one group input over all samples, X^T X as a few large products."""
    stats = ActivationStats()
    chunk: list[torch.Tensor] = []
    size = 0
    for x in xs:
        chunk.append(x.reshape(-1, x.shape[-1]))
        size += chunk[-1].shape[0]
        if size >= HESSIAN_CHUNK_TOKENS:
            stats.update(torch.cat(chunk), with_hessian)
            chunk, size = [], 0
    if chunk:
        stats.update(torch.cat(chunk), with_hessian)
    return stats


@torch.no_grad()
def compress_sequential(
    parts: PreNormParts,
    inputs: list[LayerInput],
    compress_group: GroupCompressor,
    last: bool,
) -> None:
    """Compress the layer group by group; replace `inputs` in place by the layer's outputs.

    `compress_group(names, xs)` compresses the named Linears given their inputs. The outputs are
    skipped for the last layer (nothing reads them).
    """
    hidden = [args[0] for args, _ in inputs]
    normed = [parts.attn_norm(h) for h in hidden]
    compress_group(parts.groups[0], normed)
    inner = []
    for i, (_, kwargs) in enumerate(inputs):
        inner.append(_attention_inner(parts, normed[i], kwargs))
        normed[i] = None
    del normed
    compress_group(parts.groups[1], inner)
    for i in range(len(hidden)):
        hidden[i] = _residual(hidden[i], parts.o_proj(inner[i]), parts.post_attn_norm)
        inner[i] = None
    normed = [parts.mlp_norm(h) for h in hidden]
    compress_group(parts.groups[2], normed)
    inner = []
    for i in range(len(normed)):
        inner.append(_mlp_inner(parts, normed[i]))
        normed[i] = None
    compress_group(parts.groups[3], inner)
    if last:
        return
    for i, (args, kwargs) in enumerate(inputs):
        inputs[i] = ((_residual(hidden[i], parts.down_proj(inner[i]), parts.post_mlp_norm), *args[1:]), kwargs)
        inner[i] = hidden[i] = None

