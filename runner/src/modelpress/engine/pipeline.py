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

from modelpress.engine.checkpoint_writer import ShardedSafetensorsWriter, write_module
from modelpress.engine.layer_pass import GroupInput, LayerInput, compress_sequential, find_parts, reproduces_layer
from modelpress.engine.modifier import LayerState, Modifier, Plan
from modelpress.engine.quantize import QuantizedLinear
from modelpress.engine.resume import FinishedLayer, LayerRecorder, ResumeState
from modelpress.engine.statistics import ActivationStats, StatsCollector, group_stats
from modelpress.engine.weights import SafetensorsSource, materialize, release, trim_heap, untie_from_embeddings



@dataclass(frozen=True)
class LayerProgress:
    """How far the pipeline is: `layer` of `layers` done, and the time the rest should take.

    `resumed_at` is the first layer this run computed: the ones before it were finished by an
    earlier, interrupted run.
    """

    layer: int
    layers: int
    eta_seconds: int
    resumed_at: int = 0

    @property
    def percent(self) -> float:
        return round(100 * self.layer / self.layers, 1)


ProgressFn = Callable[[LayerProgress], None]


@dataclass
class LayerReport:
    index: int
    seconds: float
    sequential: bool  # compressed part by part (one pass) rather than calibrate-then-propagate
    quantized: list[str] = field(default_factory=list)
    losses: dict[str, float] = field(default_factory=dict)
    sparsity: dict[str, float] = field(default_factory=dict)
    dampening: dict[str, float] = field(default_factory=dict)


class _Captured(Exception):
    """Raised by the first layer's hook: everything past it is not needed to capture inputs."""


@torch.no_grad()
def capture_first_layer_inputs(
    model: torch.nn.Module, first_layer: torch.nn.Module, samples: list[torch.Tensor], device: torch.device
) -> list[LayerInput]:
    """Run embeddings (and whatever precedes layer 0) per sample; keep layer 0's call arguments.

    Samples of one length get equal position tensors (rotary cos/sin, position ids); one copy of
    each is kept, since every sample would otherwise hold its own.
    """
    captured: list[LayerInput] = []
    pool: dict[tuple, list[torch.Tensor]] = {}

    def hook(_module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
        kwargs = {k: v for k, v in kwargs.items() if k not in ("past_key_values", "past_key_value")}
        captured.append((args, _share_equal(kwargs, pool)))
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


def _share_equal(value: Any, pool: dict[tuple, list[torch.Tensor]]) -> Any:
    """`value` with each tensor replaced by an equal one from `pool`, where there is one (else added)."""
    if isinstance(value, torch.Tensor):
        same_kind = pool.setdefault((value.shape, value.dtype, value.device), [])
        kept = next((t for t in same_kind if torch.equal(t, value)), None)
        if kept is None:
            same_kind.append(value)
        return value if kept is None else kept
    if type(value) in (tuple, list):
        return type(value)(_share_equal(v, pool) for v in value)
    if isinstance(value, dict):
        return {k: _share_equal(v, pool) for k, v in value.items()}
    return value


@torch.no_grad()
def run_layer(layer: torch.nn.Module, inputs: list[LayerInput]) -> list[LayerInput]:
    """Forward every sample through one layer; the outputs are the next layer's inputs."""
    outputs = []
    for args, kwargs in inputs:
        out = layer(*args, **kwargs)
        hidden = out[0] if isinstance(out, tuple) else out
        outputs.append(((hidden, *args[1:]), kwargs))
    return outputs


def _statistics_wanted(modifiers: list[Modifier]) -> tuple[bool, bool]:
    """Whether any modifier reads X^T X, and whether any reads input ranges."""
    return any(m.needs_hessians() for m in modifiers), any(m.needs_ranges() for m in modifiers)


@torch.no_grad()
def compress_layer(
    layer: torch.nn.Module,
    prefix: str,
    modifiers: list[Modifier],
    plans: list[Plan],
    inputs: list[LayerInput] | None,
    state: LayerState,
) -> dict[str, QuantizedLinear]:
    """The generic path: calibrate the whole layer on its inputs, then apply every modifier.

    Every Linear sees the float layer's activations; the caller runs the layer again afterwards
    to propagate the compressed outputs.
    """
    linears = {f"{prefix}{n}": m for n, m in layer.named_modules() if isinstance(m, torch.nn.Linear)}
    targeted = {n: m for n, m in linears.items() if any(n in plan for plan in plans)}
    stats = {}
    if inputs is not None and any(m.needs_data() for m in modifiers):
        hessians, ranges = _statistics_wanted(modifiers)
        with StatsCollector(targeted, hessians, ranges) as collector:
            run_layer(layer, inputs)
        stats = collector.stats
        if any(getattr(m, "offload_hessians", False) for m in modifiers):
            for s in stats.values():
                s.xtx = s.xtx.cpu() if s.xtx is not None else None
    return _apply_all(modifiers, plans, targeted, stats, state)


def _apply_all(
    modifiers: list[Modifier],
    plans: list[Plan],
    modules: dict[str, torch.nn.Linear],
    stats: dict[str, ActivationStats],
    state: LayerState,
) -> dict[str, QuantizedLinear]:
    """Every modifier in recipe order, each on the modules it planned for."""
    quantized: dict[str, QuantizedLinear] = {}
    for modifier, plan in zip(modifiers, plans):
        mine = {n: m for n, m in modules.items() if n in plan}
        if mine:
            quantized.update(modifier.apply(plan, mine, stats, state))
    return quantized


def compress_layer_sequential(
    layer: torch.nn.Module,
    prefix: str,
    modifiers: list[Modifier],
    plans: list[Plan],
    inputs: list[LayerInput],
    state: LayerState,
    last: bool,
) -> dict[str, QuantizedLinear] | None:
    """The one-pass path (see layer_pass.py), or None when the layer's layout is not known.

    `inputs` becomes the layer's outputs in place.
    """
    parts = find_parts(layer)
    if parts is None or not reproduces_layer(layer, parts, inputs[0]):
        return None
    quantized: dict[str, QuantizedLinear] = {}
    state.quantized = quantized
    hessians, ranges = _statistics_wanted(modifiers)

    def compress_group(names: list[str], rows: GroupInput) -> None:
        modules = {f"{prefix}{n}": layer.get_submodule(n) for n in names}
        modules = {n: m for n, m in modules.items() if any(n in plan for plan in plans)}
        if modules:
            shared = group_stats(rows.chunks, hessians, ranges)
            state.inputs = rows  # smoothing rescales them (and `shared`) in place to the smoothed model
            quantized.update(_apply_all(modifiers, plans, modules, {n: shared for n in modules}, state))
            state.inputs = None
            del shared
            trim_heap()  # the statistics and the algorithms' temporaries

    compress_sequential(parts, inputs, compress_group, last)
    return quantized


def run_pipeline(
    layers_prefix: str,
    layers: torch.nn.ModuleList,
    modifiers: list[Modifier],
    plans: list[Plan],
    inputs: list[LayerInput] | None,
    source: SafetensorsSource | None,
    writer: ShardedSafetensorsWriter | None,
    device: torch.device,
    progress: ProgressFn | None = None,
    resume: ResumeState | None = None,
) -> tuple[dict[str, QuantizationScheme], list[LayerReport]]:
    """Compress every decoder layer in order; stream each one in from `source` and out to `writer`.

    With `source` None the model is already in memory: layers visit `device` and go back.
    With `resume`, each finished layer is kept there, and the layers an earlier run finished are
    replayed from it rather than computed. Returns the scheme of every quantized module, and a
    report per layer.
    """
    schemes: dict[str, QuantizationScheme] = {}
    reports: list[LayerReport] = []
    start = time.monotonic()
    uses_data = inputs is not None and any(m.needs_data() for m in modifiers)
    first = resume.finished(len(layers), needs_activations=inputs is not None) if resume is not None else 0
    for i in range(first):
        finished = resume.load_layer(i)  # type: ignore[union-attr]
        for name, tensor in finished.tensors.items():
            if writer is not None:
                writer.add(name, tensor)
        schemes.update(finished.schemes)
        reports.append(finished.report)
    if first and inputs is not None:
        hidden = resume.load_activations(device)  # type: ignore[union-attr]
        inputs = [((h, *args[1:]), kwargs) for h, (args, kwargs) in zip(hidden, inputs)]
    for i, layer in enumerate(layers):
        if i < first:
            continue
        t0 = time.monotonic()
        prefix = f"{layers_prefix}.{i}."
        home = None
        if source is not None:
            materialize(layer, prefix, source, device)
        else:
            home = next(layer.parameters()).device
            layer.to(device)
        for modifier, plan in zip(modifiers, plans):
            modifier.transform_layer(plan, layer, prefix)
        state = LayerState()
        last = i + 1 == len(layers)
        done = None
        if inputs is not None and uses_data:
            done = compress_layer_sequential(layer, prefix, modifiers, plans, inputs, state, last)
        sequential = done is not None
        if done is None:
            done = compress_layer(layer, prefix, modifiers, plans, inputs, state)
            if inputs is not None and not last:
                inputs = run_layer(layer, inputs)
        recorder = LayerRecorder(writer) if resume is not None else None
        sink = recorder or writer
        if sink is not None:
            write_module(sink, prefix, layer, done)
        if source is not None:
            release(layer)
        else:
            layer.to(home)
        layer_schemes = {name: ql.scheme for name, ql in done.items()}
        schemes.update(layer_schemes)
        report = LayerReport(i, time.monotonic() - t0, sequential, sorted(done), state.losses, state.sparsity, state.dampening)
        reports.append(report)
        if resume is not None and recorder is not None:
            resume.save_layer(i, FinishedLayer(recorder.tensors, layer_schemes, report))
            if inputs is not None and not last:
                resume.save_activations(i, [args[0] for args, _ in inputs])
        del recorder
        if progress is not None:
            per_layer = (time.monotonic() - start) / (i + 1 - first)
            progress(LayerProgress(i + 1, len(layers), round(per_layer * (len(layers) - i - 1)), first))
    return schemes, reports


def compress_outside_layers(
    model: torch.nn.Module, inside: str, modifiers: list[Modifier], plans: list[Plan]
) -> dict[str, QuantizedLinear]:
    """Compress the planned modules outside the decoder layers (the head), which need no data.

    A head tied to the input embeddings gets its own copy first, so the embeddings stay as they are.
    """
    done: dict[str, QuantizedLinear] = {}
    for modifier, plan in zip(modifiers, plans):
        names = [n for n in plan if not n.startswith(inside)]
        untie_from_embeddings(model, names)
        done.update(modifier.apply(plan, {n: model.get_submodule(n) for n in names}, {}, LayerState()))
    return done
