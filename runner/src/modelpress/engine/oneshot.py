"""`oneshot`: compress a model with a recipe in one pass and write a vLLM-ready checkpoint.

It runs its stages, each a function below: load (the model, streamed or in memory), plan (every
modifier's targets, checked before any weight is read), transform (rotations of the float model's
outer parts), calibrate (the first decoder layer's inputs), compress (layer by layer, then the
head), write (every other file, by the checkpoint writer).
"""

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from compressed_tensors.quantization import QuantizationScheme
from transformers import PreTrainedModel

from modelpress.engine.calibration import CalibrationData, calibration_samples, needs_tokenizer
from modelpress.engine.checkpoint_writer import (
    ShardedSafetensorsWriter,
    model_bytes,
    prepare_output_dir,
    write_metadata,
    write_module,
    write_report,
)
from modelpress.engine.errors import ModelPressError
from modelpress.engine.experts import (
    ExpertLayout,
    expert_layout,
    from_checkpoint_name,
    route_all_tokens,
    to_checkpoint_name,
    unfuse_experts,
)
from modelpress.contract import ActivationStorage
from modelpress.engine.activations import Storage
from modelpress.engine.layer_pass import Calibration
from modelpress.engine.modifier import Modifier, Plan, plan_recipe
from modelpress.engine.pipeline import (
    LayerReport,
    ProgressFn,
    capture_calibration,
    compress_outside_layers,
    run_pipeline,
)
from modelpress.engine.recipe import RecipeInput, load_recipe, recipe_yaml
from modelpress.engine.resume import ResumeState, resume_key
from modelpress.engine.weights import (
    SafetensorsSource,
    build_skeleton,
    find_decoder_layers,
    load_config,
    load_tokenizer,
    materialize,
    missing_weights,
    move_outside,
    release_outside,
    resolve_model_dir,
)

log = logging.getLogger(__name__)


@dataclass
class OneshotResult:
    output_dir: Path | None
    quantized_modules: int
    layers: list[LayerReport]
    input_bytes: int
    output_bytes: int
    seconds: float
    model: torch.nn.Module | None = field(default=None, repr=False)  # only when a loaded model was given

    @property
    def ratio(self) -> float:
        return self.input_bytes / self.output_bytes if self.output_bytes else 0.0


@dataclass
class Loaded:
    """The model as the stages after loading see it."""

    model: torch.nn.Module
    model_dir: Path | None  # where its tokenizer and aux files are, when known
    source: SafetensorsSource | None  # streamed from disk; None: already in memory
    layout: ExpertLayout | None
    input_bytes: int
    layers_prefix: str
    layers: torch.nn.ModuleList
    home: torch.device  # where the parameters outside the layers were (meta when streamed)

    @property
    def inside(self) -> str:
        """The name prefix of every module inside the decoder layers."""
        return f"{self.layers_prefix}."

    def checkpoint_name(self, name: str) -> str:
        """A module or tensor name as the checkpoint spells it (fused experts, see experts.py)."""
        return to_checkpoint_name(name, self.layout)


@dataclass
class Samples:
    """How to build the calibration samples (oneshot's arguments of the same names)."""

    dataset: CalibrationData | None
    tokenizer: Any
    num_samples: int
    max_seq_length: int
    seed: int
    text_field: str
    messages_field: str
    trust_remote_code: bool


@dataclass
class Compressed:
    schemes: dict[str, QuantizationScheme]  # of every quantized module
    reports: list[LayerReport]


def oneshot(
    model: str | Path | PreTrainedModel,
    dataset: CalibrationData | None = None,
    recipe: RecipeInput | None = None,
    num_calibration_samples: int = 512,
    max_seq_length: int = 2048,
    output_dir: str | Path | None = None,
    device: str | torch.device | None = None,
    tokenizer: Any = None,
    seed: int = 42,
    text_field: str = "text",
    messages_field: str = "messages",
    revision: str | None = None,
    trust_remote_code: bool = False,
    max_shard_bytes: int = 5 * 2**30,
    progress: ProgressFn | None = None,
    resume_dir: str | Path | None = None,
    activation_storage: ActivationStorage = "memory",
    spill_dir: str | Path | None = None,
) -> OneshotResult:
    """Apply `recipe` to `model` layer by layer and, with `output_dir`, write the checkpoint.

    `model` is a model directory, a hub id, or a loaded transformers model (compressed in place;
    its weights become the dequantized quantized weights). A directory or hub id is streamed:
    only one decoder layer is in memory at a time. With `resume_dir` (streamed models only) each
    finished layer is kept there, and a call that was killed continues at its first unfinished
    layer, writing the same checkpoint an uninterrupted call writes.
    """
    start = time.monotonic()
    if recipe is None:
        raise ModelPressError("recipe: missing; give modifiers or a YAML recipe")
    modifiers = load_recipe(recipe)
    device = torch.device(device) if device is not None else _default_device()

    loaded = load(model, output_dir, revision, trust_remote_code)
    plans = plan(loaded, modifiers, has_data=dataset is not None)
    out = prepare_output_dir(output_dir)
    samples = Samples(dataset, tokenizer, num_calibration_samples, max_seq_length, seed, text_field, messages_field, trust_remote_code)
    bring_outside(loaded, modifiers, device)
    plans = transform(loaded, modifiers, plans)
    storage = Storage(activation_storage, Path(spill_dir) if spill_dir is not None else None, device)
    try:
        inputs, tokenizer, ids = calibrate(loaded, modifiers, samples, device, storage)
        resume = None
        if resume_dir is not None:
            if loaded.source is None or loaded.model_dir is None:
                raise ModelPressError("resume_dir: only a model given by directory or hub id can resume; drop resume_dir")
            key = resume_key(recipe_yaml(modifiers), ids, loaded.model_dir, len(loaded.layers))
            resume = ResumeState(Path(resume_dir), key)
        writer = ShardedSafetensorsWriter(out, max_shard_bytes, loaded.checkpoint_name) if out is not None else None
        compressed = compress(loaded, modifiers, plans, inputs, writer, device, progress, resume, storage)
    finally:
        storage.close()
    if writer is not None:
        write(writer, loaded, modifiers, plans, compressed, tokenizer)
    if loaded.source is None:  # the parts outside the layers go back where the caller had them
        move_outside(loaded.model, loaded.inside, loaded.home)
    return OneshotResult(
        output_dir=out,
        quantized_modules=len(compressed.schemes),
        layers=compressed.reports,
        input_bytes=loaded.input_bytes,
        output_bytes=model_bytes(out) if out is not None else 0,
        seconds=time.monotonic() - start,
        model=loaded.model if loaded.source is None else None,
    )


def load(model: str | Path | PreTrainedModel, output_dir: str | Path | None, revision: str | None, trust_remote_code: bool) -> Loaded:
    """A loaded model as it is, or a skeleton whose weights are read from disk as they are needed."""
    if isinstance(model, torch.nn.Module):
        model_dir = Path(model.name_or_path) if Path(getattr(model, "name_or_path", "") or "-").is_dir() else None
        source = None
        input_bytes = sum(t.numel() * t.element_size() for t in {p.data_ptr(): p for p in model.parameters()}.values())
        layout = expert_layout(model.config.model_type)
        unfuse_experts(model, layout)
    else:
        if output_dir is None:
            raise ModelPressError("output_dir: required when the model is given by path or hub id")
        model_dir = resolve_model_dir(model, revision)
        model_config = load_config(model_dir, trust_remote_code)
        layout = expert_layout(model_config.model_type)
        source = SafetensorsSource(model_dir, lambda name: from_checkpoint_name(name, layout))
        model = build_skeleton(model_config, trust_remote_code)
        unfuse_experts(model, layout)
        missing = missing_weights(model, source)
        if missing:
            raise ModelPressError(
                f"model: the checkpoint in {model_dir} lacks {len(missing)} weight(s) the architecture expects "
                f"(first: {missing[0]}); is it a complete transformers checkpoint?"
            )
        input_bytes = source.nbytes()
    layers_prefix, layers = find_decoder_layers(model)
    home = next(p.device for n, p in model.named_parameters() if not n.startswith(f"{layers_prefix}."))
    return Loaded(model, model_dir, source, layout, input_bytes, layers_prefix, layers, home)


def plan(loaded: Loaded, modifiers: list[Modifier], has_data: bool) -> list[Plan]:
    """Every modifier's plan, and a refusal, before any weight is read, of what cannot work."""
    plans = plan_recipe(modifiers, loaded.model)
    if any(m.needs_data() for m in modifiers):
        if not has_data:
            needing = ", ".join(sorted({type(m).__name__ for m in modifiers if m.needs_data()}))
            raise ModelPressError(f"dataset: the recipe needs calibration data ({needing}); pass a dataset")
        outside = sorted(n for p in plans for n in p if not n.startswith(loaded.inside))
        if outside:
            raise ModelPressError(f"ignore: {outside} sit outside the decoder layers and cannot be calibrated; add them to ignore")
    return plans


def bring_outside(loaded: Loaded, modifiers: list[Modifier], device: torch.device) -> None:
    """Read what precedes and follows the decoder layers (embeddings, final norm, head) onto `device`,
    when calibration or a transform needs them before the layers (else `compress` reads them after)."""
    if loaded.source is not None and (any(m.needs_data() for m in modifiers) or not rereadable(loaded, modifiers)):
        materialize(loaded.model, "", loaded.source, device, skip_prefix=loaded.inside)
        loaded.model.tie_weights()
    move_outside(loaded.model, loaded.inside, device)


def transform(loaded: Loaded, modifiers: list[Modifier], plans: list[Plan]) -> list[Plan]:
    """Let each modifier change the float model's outer parts before calibration (rotations), and
    return the plans the layers get."""
    if loaded.source is not None:
        source = loaded.source
        read = lambda name: source.get(name)  # noqa: E731
    else:
        params = dict(loaded.model.named_parameters(remove_duplicate=False))
        read = lambda name: params[name].detach()  # noqa: E731
    return [m.transform_model(p, loaded.model, read) for m, p in zip(modifiers, plans)]


def calibrate(
    loaded: Loaded, modifiers: list[Modifier], samples: Samples, device: torch.device, storage: Storage
) -> tuple[Calibration | None, Any, list[torch.Tensor]]:
    """Capture the first decoder layer's inputs (the parts before it are on `device`), kept in `storage`.

    Returns them (None when the recipe needs no data), the tokenizer, loaded from the model
    when none was given and the samples need tokenizing, and the calibration token ids.
    """
    model = loaded.model
    needs_data = any(m.needs_data() for m in modifiers)
    tokenizer = samples.tokenizer
    if not needs_data:
        return None, tokenizer, []
    # without a model folder to copy its files from, the output needs the tokenizer object itself
    if tokenizer is None and (needs_tokenizer(samples.dataset) or loaded.model_dir is None):
        tokenizer = load_tokenizer(loaded.model_dir or model.name_or_path, samples.trust_remote_code)
    ids = calibration_samples(
        samples.dataset, tokenizer, samples.num_samples, samples.max_seq_length, samples.seed, samples.text_field, samples.messages_field
    )
    if not ids:
        raise ModelPressError("dataset: no usable calibration samples (all empty?)")
    inputs = capture_calibration(model, loaded.layers[0], ids, device, storage)
    if rereadable(loaded, modifiers):  # read again once the layers are done: a large vocabulary's embeddings are GBs
        release_outside(model, loaded.inside)
    return inputs, tokenizer, ids


def rereadable(loaded: Loaded, modifiers: list[Modifier]) -> bool:
    """Whether the parts outside the layers can be dropped and read again from disk: they are
    streamed, and no modifier changed them in memory (a rotation did)."""
    return loaded.source is not None and all(type(m).transform_model is Modifier.transform_model for m in modifiers)


def compress(
    loaded: Loaded,
    modifiers: list[Modifier],
    plans: list[Plan],
    inputs: Calibration | None,
    writer: ShardedSafetensorsWriter | None,
    device: torch.device,
    progress: ProgressFn | None,
    resume: ResumeState | None = None,
    storage: Storage | None = None,
) -> Compressed:
    """Every decoder layer in turn, each streamed out to `writer` when done, then the head and the
    rest outside the layers."""
    route_all_tokens(loaded.model, True)
    try:
        schemes, reports = run_pipeline(loaded.layers_prefix, loaded.layers, modifiers, plans, inputs, loaded.source, writer, device,
                                        progress, resume, storage)
    finally:
        route_all_tokens(loaded.model, False)  # an in-memory model goes back to routed inference
    if rereadable(loaded, modifiers):
        materialize(loaded.model, "", loaded.source, device, skip_prefix=loaded.inside)
        loaded.model.tie_weights()
    outside = compress_outside_layers(loaded.model, loaded.inside, modifiers, plans)
    schemes.update({n: ql.scheme for n, ql in outside.items()})
    if writer is not None:
        write_module(writer, "", loaded.model, outside, skip_prefix=loaded.inside)
    return Compressed(schemes, reports)


def write(
    writer: ShardedSafetensorsWriter,
    loaded: Loaded,
    modifiers: list[Modifier],
    plans: list[Plan],
    compressed: Compressed,
    tokenizer: Any,
) -> None:
    """Finish the checkpoint the layers were streamed into: the shards and their index, then
    config, recipe, tokenizer and report."""
    writer.close()
    out = writer.out_dir
    write_metadata(
        out,
        loaded.model,
        [p.groups for p in plans],
        compressed.schemes,
        recipe_yaml(modifiers),
        loaded.model_dir,
        tokenizer,
        loaded.checkpoint_name,
    )
    write_report(out, compressed.reports)


def _default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")
