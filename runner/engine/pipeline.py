"""The layer-by-layer pipeline: capture the first layer's inputs, then per decoder layer
load -> calibrate -> compress -> propagate -> write -> free.

Each layer's inputs are the outputs of the already-compressed layer before it, so the error of
earlier layers is seen (and, for GPTQ, compensated) by later ones. Peak memory is one layer plus
the calibration activations.
"""

import time
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from compressed_tensors.quantization import QuantizationScheme

from modelpress.runner.engine.calibration import ActivationStats, StatsCollector
from modelpress.runner.engine.checkpoint import ShardedSafetensorsWriter, write_module
from modelpress.runner.engine.modifiers import Modifier
from modelpress.runner.engine.quantize import QuantizedLinear
from modelpress.runner.engine.weights import SafetensorsSource, materialize, release

LayerInput = tuple[tuple[Any, ...], dict[str, Any]]  # a decoder layer's (args, kwargs) for one sample
ProgressFn = Callable[[dict[str, Any]], None]


@dataclass
class LayerReport:
    index: int
    seconds: float
    quantized: list[str] = field(default_factory=list)


class _Captured(Exception):
    """Raised by the first layer's hook: everything past it is not needed to capture inputs."""


@torch.no_grad()
def capture_first_layer_inputs(
    model: torch.nn.Module, first_layer: torch.nn.Module, samples: list[torch.Tensor], device: torch.device
) -> list[LayerInput]:
    """Run embeddings (and whatever precedes layer 0) per sample; keep layer 0's call arguments."""
    captured: list[LayerInput] = []

    def hook(_module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
        kwargs = {k: v for k, v in kwargs.items() if k not in ("past_key_values", "past_key_value")}
        captured.append((args, kwargs))
        raise _Captured

    handle = first_layer.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        for ids in samples:
            try:
                model(input_ids=ids.to(device), use_cache=False)
            except _Captured:
                pass
    finally:
        handle.remove()
    return captured


@torch.no_grad()
def run_layer(layer: torch.nn.Module, inputs: list[LayerInput]) -> list[LayerInput]:
    """Forward every sample through one layer; the outputs are the next layer's inputs."""
    outputs = []
    for args, kwargs in inputs:
        out = layer(*args, **kwargs)
        hidden = out[0] if isinstance(out, tuple) else out
        outputs.append(((hidden, *args[1:]), kwargs))
    return outputs


@torch.no_grad()
def compress_layer(
    layer: torch.nn.Module,
    prefix: str,
    modifiers: list[Modifier],
    plans: list[dict[str, Any]],
    inputs: list[LayerInput] | None,
) -> dict[str, QuantizedLinear]:
    """Calibrate one layer on its inputs (when a modifier needs data) and apply every modifier."""
    linears = {f"{prefix}{n}": m for n, m in layer.named_modules() if isinstance(m, torch.nn.Linear)}
    targeted = {n: m for n, m in linears.items() if any(n in plan for plan in plans)}
    stats: dict[str, ActivationStats] = {}
    if inputs is not None and any(m.needs_data() for m in modifiers):
        with StatsCollector(targeted, hessians=any(m.needs_hessians for m in modifiers)) as collector:
            run_layer(layer, inputs)
        stats = collector.stats
    quantized: dict[str, QuantizedLinear] = {}
    for modifier, plan in zip(modifiers, plans):
        mine = {n: m for n, m in targeted.items() if n in plan}
        quantized.update(modifier.apply(mine, stats))
    return quantized


def run_pipeline(
    layers_prefix: str,
    layers: torch.nn.ModuleList,
    modifiers: list[Modifier],
    plans: list[dict[str, Any]],
    inputs: list[LayerInput] | None,
    source: SafetensorsSource | None,
    writer: ShardedSafetensorsWriter | None,
    device: torch.device,
    progress: ProgressFn | None = None,
) -> tuple[dict[str, QuantizationScheme], list[LayerReport]]:
    """Compress every decoder layer in order; stream each one in from `source` and out to `writer`.

    With `source` None the model is already in memory: layers visit `device` and go back.
    Returns the scheme of every quantized module, and a report per layer.
    """
    schemes: dict[str, QuantizationScheme] = {}
    reports: list[LayerReport] = []
    start = time.monotonic()
    for i, layer in enumerate(layers):
        t0 = time.monotonic()
        prefix = f"{layers_prefix}.{i}."
        home = None
        if source is not None:
            materialize(layer, prefix, source, device)
        else:
            home = next(layer.parameters()).device
            layer.to(device)
        done = compress_layer(layer, prefix, modifiers, plans, inputs)
        if inputs is not None and i + 1 < len(layers):
            inputs = run_layer(layer, inputs)
        if writer is not None:
            write_module(writer, prefix, layer, done)
        if source is not None:
            release(layer)
        else:
            layer.to(home)
        schemes.update({name: ql.scheme for name, ql in done.items()})
        reports.append(LayerReport(i, time.monotonic() - t0, sorted(done)))
        if progress is not None:
            elapsed = time.monotonic() - start
            progress(
                {
                    "event": "progress",
                    "stage": "compress",
                    "layer": i + 1,
                    "layers": len(layers),
                    "percent": round(100 * (i + 1) / len(layers), 1),
                    "eta_s": round(elapsed / (i + 1) * (len(layers) - i - 1)),
                }
            )
    return schemes, reports
