"""The layer-by-layer pipeline: capture the first layer's inputs, then per decoder layer
load -> calibrate -> compress -> propagate -> write -> free.

Each layer's inputs are the outputs of the already-compressed layer before it, so the error of
earlier layers is seen (and, for GPTQ, compensated) by later ones. Peak memory is one layer plus
the calibration activations. A recipe that aims at the float model's outputs (GPTQ's
`float_target`) also carries the float model's hidden states, through a float copy of each layer:
one more layer and twice the activations.
"""

import copy
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from compressed_tensors.quantization import QuantizationScheme

from modelpress.engine.checkpoint_writer import ShardedSafetensorsWriter, write_module
from modelpress.engine.activations import Rows, Storage
from modelpress.engine.layer_pass import TOKEN_CHUNK, Calibration, LayerInput, collect, compress_sequential, find_parts, reproduces_layer
from modelpress.engine.modifier import LayerState, Modifier, Plan
from modelpress.engine.quantize import QuantizedLinear
from modelpress.engine.resume import FinishedLayer, LayerRecorder, ResumeState
from modelpress.engine.statistics import ActivationStats, StatsCollector, group_stats
from modelpress.engine.weights import ReadAhead, SafetensorsSource, materialize, release, trim_heap, untie_from_embeddings



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
    model: torch.nn.Module,
    first_layer: torch.nn.Module,
    samples: list[torch.Tensor],
    device: torch.device,
    keep: Callable[[LayerInput], Any] = lambda sample: sample,
) -> list[Any]:
    """Run embeddings (and whatever precedes layer 0) per sample; keep layer 0's call arguments
    (what `keep` makes of them, as each sample is captured).

    Samples of one length get equal position tensors (rotary cos/sin, position ids); one copy of
    each is kept, since every sample would otherwise hold its own.
    """
    captured: list[Any] = []
    pool: dict[tuple, list[torch.Tensor]] = {}

    def hook(_module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
        kwargs = {k: v for k, v in kwargs.items() if k not in ("past_key_values", "past_key_value")}
        captured.append(keep((args, _share_equal(kwargs, pool))))
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


def capture_calibration(
    model: torch.nn.Module, first_layer: torch.nn.Module, samples: list[torch.Tensor], device: torch.device, storage: Storage
) -> Calibration:
    """The first layer's inputs with every sample's hidden states written into one `Rows` of
    `storage` as it is captured, so that no more than one sample's are held besides."""
    tokens = sum(ids.numel() for ids in samples)
    bounds = [0]
    rows: list[Rows] = []

    def keep(sample: LayerInput) -> LayerInput:
        (hidden, *args), kwargs = sample
        hidden = hidden.reshape(-1, hidden.shape[-1])
        if not rows:
            rows.append(storage.rows(tokens, hidden.shape[-1], hidden.dtype, TOKEN_CHUNK))
        rows[0].write(bounds[-1], hidden)
        bounds.append(bounds[-1] + hidden.shape[0])
        return tuple(args), kwargs

    rest = capture_first_layer_inputs(model, first_layer, samples, device, keep)
    return Calibration(rows[0], bounds, rest)


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


@torch.no_grad()
def run_layer_rows(layer: torch.nn.Module, calibration: Calibration, storage: Storage | None) -> Calibration | None:
    """Forward every sample through one layer; with `storage`, the outputs (the next layer's
    inputs) are kept in new Rows of it and the inputs' are released, else they are dropped."""
    out: Rows | None = None
    for i in range(len(calibration)):
        args, kwargs = calibration.sample(i)
        y = layer(*args, **kwargs)
        y = y[0] if isinstance(y, tuple) else y
        if storage is not None:
            y = y.reshape(-1, y.shape[-1])
            out = out if out is not None else storage.rows(calibration.hidden.tokens, y.shape[-1], y.dtype, TOKEN_CHUNK)
            out.write(calibration.bounds[i], y)
    if out is None:
        return None
    calibration.hidden.close()
    return Calibration(out, calibration.bounds, calibration.rest, calibration.float_hidden)


def advance_float(layer: torch.nn.Module, calibration: Calibration, storage: Storage) -> None:
    """The float hidden states become `layer`'s outputs (the float copy of a layer not split)."""
    assert calibration.float_hidden is not None
    floats = Calibration(calibration.float_hidden, calibration.bounds, calibration.rest)
    calibration.float_hidden = run_layer_rows(layer, floats, storage).hidden  # type: ignore[union-attr]


def carry_float(calibration: Calibration, storage: Storage) -> None:
    """Start the float stream: layer 0's float inputs are the compressed model's (nothing before it is compressed)."""
    hidden = calibration.hidden
    calibration.float_hidden = collect(hidden.chunks(), hidden.tokens, storage, hidden.piece)


def _statistics_wanted(modifiers: list[Modifier]) -> tuple[bool, bool]:
    """Whether any modifier reads X^T X, and whether any reads input ranges."""
    return any(m.needs_hessians() for m in modifiers), any(m.needs_ranges() for m in modifiers)


@torch.no_grad()
def compress_layer(
    layer: torch.nn.Module,
    prefix: str,
    modifiers: list[Modifier],
    plans: list[Plan],
    inputs: Calibration | None,
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
            run_layer_rows(layer, inputs, None)
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
    inputs: Calibration,
    state: LayerState,
    last: bool,
    storage: Storage,
    float_layer: torch.nn.Module | None = None,
) -> dict[str, QuantizedLinear] | None:
    """The one-pass path (see layer_pass.py), or None when the layer's layout is not known.

    The hidden states of `inputs` become the layer's outputs in place; with `float_layer` (the
    layer's float copy), its float hidden states the float layer's.
    """
    parts = find_parts(layer)
    if parts is None or not reproduces_layer(layer, parts, inputs.sample(0)):
        return None
    float_parts = find_parts(float_layer) if float_layer is not None else None
    quantized: dict[str, QuantizedLinear] = {}
    state.quantized = quantized
    hessians, ranges = _statistics_wanted(modifiers)

    def compress_group(names: list[str], rows: Rows, float_rows: Rows | None) -> None:
        modules = {f"{prefix}{n}": layer.get_submodule(n) for n in names}
        modules = {n: m for n, m in modules.items() if any(n in plan for plan in plans)}
        if modules:
            shared = group_stats(rows.chunks, hessians, ranges, float_rows.chunks if float_rows is not None else None)
            state.inputs = rows  # smoothing rescales them (and `shared`) in place to the smoothed model
            quantized.update(_apply_all(modifiers, plans, modules, {n: shared for n in modules}, state))
            state.inputs = None
            del shared
            trim_heap()  # the statistics and the algorithms' temporaries

    compress_sequential(parts, inputs, compress_group, last, storage, float_parts)
    return quantized


def run_pipeline(
    layers_prefix: str,
    layers: torch.nn.ModuleList,
    modifiers: list[Modifier],
    plans: list[Plan],
    inputs: Calibration | None,
    source: SafetensorsSource | None,
    writer: ShardedSafetensorsWriter | None,
    device: torch.device,
    progress: ProgressFn | None = None,
    resume: ResumeState | None = None,
    storage: Storage | None = None,
) -> tuple[dict[str, QuantizationScheme], list[LayerReport]]:
    """Compress every decoder layer in order; stream each one in from `source` and out to `writer`.

    With `source` None the model is already in memory: layers visit `device` and go back.
    With `resume`, each finished layer is kept there, and the layers an earlier run finished are
    replayed from it rather than computed. `storage` makes the activations kept for all
    calibration tokens (in memory as computed when None). Returns the scheme of every quantized
    module, and a report per layer.
    """
    storage = storage or Storage(device=device)
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
    floats = inputs is not None and uses_data and any(m.needs_float_inputs() for m in modifiers)
    if floats:
        carry_float(inputs, storage)  # type: ignore[arg-type]
    if first and inputs is not None:
        resume.load_activations(inputs.hidden, inputs.float_hidden)  # type: ignore[union-attr]
    ahead = ReadAhead(source) if source is not None else None
    try:
        for i in range(first, len(layers)):
            layer = layers[i]
            t0 = time.monotonic()
            prefix = f"{layers_prefix}.{i}."
            home = None
            if ahead is not None:
                tensors = ahead.take(prefix)
                if i + 1 < len(layers):
                    ahead.start(f"{layers_prefix}.{i + 1}.")
                materialize(layer, prefix, tensors, device)
                del tensors
            else:
                home = next(layer.parameters()).device
                layer.to(device)
            for modifier, plan in zip(modifiers, plans):
                modifier.transform_layer(plan, layer, prefix)
            state = LayerState()
            last = i + 1 == len(layers)
            float_layer = copy.deepcopy(layer) if floats else None
            done = None
            if inputs is not None and uses_data:
                done = compress_layer_sequential(layer, prefix, modifiers, plans, inputs, state, last, storage, float_layer)
            sequential = done is not None
            if done is None:
                done = compress_layer(layer, prefix, modifiers, plans, inputs, state)
                if inputs is not None and not last:
                    if float_layer is not None:
                        advance_float(float_layer, inputs, storage)
                    inputs = run_layer_rows(layer, inputs, storage)
            del float_layer
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
                    resume.save_activations(i, inputs.hidden, inputs.float_hidden)
            del recorder
            if progress is not None:
                per_layer = (time.monotonic() - start) / (i + 1 - first)
                progress(LayerProgress(i + 1, len(layers), round(per_layer * (len(layers) - i - 1)), first))
    finally:
        if ahead is not None:
            ahead.close()
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
