"""Perplexity through the layer-at-a-time path, so evaluating a model needs one decoder layer of memory.

The same path as calibration: embeddings -> each decoder layer, read from disk and dropped ->
final norm -> head, over independent windows of the text. A compressed checkpoint is read through
`DequantizingSource`, one layer's weights dequantized at a time. The numbers are those of the
whole model's forward on the same windows.
"""

import math
from pathlib import Path

import torch

from modelpress.engine.checkpoint_reader import DequantizingSource
from modelpress.engine.errors import ModelPressError
from modelpress.engine.experts import expert_layout, from_checkpoint_name, unfuse_experts
from modelpress.engine.pipeline import capture_first_layer_inputs, run_layer
from modelpress.engine.weights import build_skeleton, find_decoder_layers, load_config, materialize, move_outside, release

FINAL_NORMS = ("norm", "final_layernorm", "ln_f")


def windows(ids: torch.Tensor, length: int) -> list[torch.Tensor]:
    """Independent windows of `length` tokens ([1, n] each); a last window of one token predicts nothing."""
    return [ids[start : start + length].unsqueeze(0) for start in range(0, len(ids) - 1, length) if len(ids[start : start + length]) > 1]


def _final_norm(model: torch.nn.Module) -> torch.nn.Module:
    base = model.get_decoder() if hasattr(model, "get_decoder") else model
    for name in FINAL_NORMS:
        if isinstance(getattr(base, name, None), torch.nn.Module):
            return getattr(base, name)
    raise ModelPressError(f"model: {type(model).__name__} has no final norm by a known name; it cannot be evaluated layer by layer")


@torch.no_grad()
def streamed_perplexity(model_dir: Path, ids: torch.Tensor, window: int, device: torch.device,
                        trust_remote_code: bool = False) -> float:
    """exp(mean next-token NLL) of the model in `model_dir` (float or compressed) over `ids` in windows."""
    config = load_config(model_dir, trust_remote_code)
    layout = expert_layout(config.model_type)
    model = build_skeleton(config, trust_remote_code)
    unfuse_experts(model, layout)
    dtype = next(model.parameters()).dtype
    source = DequantizingSource(model_dir, lambda name: from_checkpoint_name(name, layout), dtype)
    prefix, layers = find_decoder_layers(model)
    materialize(model, "", source, device, skip_prefix=f"{prefix}.")
    model.tie_weights()
    move_outside(model, f"{prefix}.", device)

    parts = windows(ids, window)
    inputs = capture_first_layer_inputs(model, layers[0], parts, device)
    for i, layer in enumerate(layers):
        materialize(layer, f"{prefix}.{i}.", source, device)
        inputs = run_layer(layer, inputs)
        release(layer)

    norm, head = _final_norm(model), model.get_output_embeddings()
    softcap = getattr(config, "final_logit_softcapping", None)
    nll, count = 0.0, 0
    for (args, _), tokens in zip(inputs, parts):
        logits = head(norm(args[0])).float()
        if softcap:
            logits = torch.tanh(logits / softcap) * softcap
        tokens = tokens.to(device)
        nll += torch.nn.functional.cross_entropy(logits[0, :-1], tokens[0, 1:], reduction="sum").item()
        count += tokens.shape[1] - 1
    return math.exp(nll / count)
