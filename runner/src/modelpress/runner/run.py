"""One CompressionJob from spec to published model, as an ordered list of stages.

Work happens in a scratch directory (`Env.SCRATCH`, the pod's volume). A retried job resumes
there: downloads continue from their `.part` files, a model already compressed for the same spec
and the same source (`reuse_key`) is not compressed again, and files already staged for
publication are not sent again. What a retry may skip is
each stage's own `skip` rule over the shared `State`, so new resumable state goes in one place.
"""

import gc
import json
import logging
import math
import shutil
import time
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from modelpress.contract import (SELF_GENERATED, ActivationStorage, CompressionJob, JobSpec, Recipe, ResultEvent, Served, ServedNll,
                                 TransferEvent, connection_uses, parse_uri)
from modelpress.engine.errors import ModelPressError
from modelpress.engine.modifier import Modifier
from modelpress.engine.recipe import load_recipe, parse_recipe, recipe_yaml
from modelpress.engine.weights import check_model_dir, load_tokenizer, read_header, shard_files
from modelpress.runner.accelerator import require_gpu
from modelpress.runner.connections import (LocalObjects, S3Connection, hf_token, recipe_text, refusing_permanently, s3_connection,
                                           secret_values)
from modelpress.runner.data import calibration_set, evaluation_text, open_dataset, self_generated
from modelpress.runner.memory import memory_limit, resident_bytes
from modelpress.runner.model_card import model_card
from modelpress.runner.preflight import NoShape, Shape, job_work, verdict
from modelpress.runner.presets import preset_document
from modelpress.runner.progress import Reporter
from modelpress.paths import PathEscape, confined, refuse_escaping_links
from modelpress.runner.publish import Output, folder_output, s3_output
from modelpress.runner.result import build_result, job_identity, job_ref, reuse_key
from modelpress.runner.served import Vllm, driver_plan, find_vllm, kv_cache_gib, model_len, run_driver, served_outcome, served_problem
from modelpress.runner.storage import (
    build_manifest,
    download_object,
    download_prefix,
    fetch_hub_model,
    folder_identity,
    list_objects,
    listing_identity,
    local_path,
    s3_client,
    source_config,
)

log = logging.getLogger(__name__)

COMPRESSED_MARKER = "compressed.done"  # holds the reuse key (spec and source) the staged model was made for
CALIBRATION = "calibration"  # the calibration samples, kept in scratch for a retry
ORIGINAL_EVALUATION = "original-evaluation"  # the original model's perplexity and answers, likewise
SPILLED = "activations"  # calibration activations spilled to disk while compressing (removed when it ends)


class GateFailed(Exception):
    """The compressed model lost more quality than `maxPerplexityIncrease` allows, or vLLM does not serve it
    as transformers reads it (`servable`)."""

    def __init__(self, message: str, result: ResultEvent) -> None:
        super().__init__(message)
        self.result = result


@dataclass
class Context:
    """Everything a job reads besides its spec: the environment, local Secrets/ConfigMaps, scratch."""

    env: Mapping[str, str]
    objects: LocalObjects
    scratch: Path
    reporter: Reporter
    device: str | None = None
    memory_limit: int | None = None  # bytes (--memory-limit); None: the cgroup's limit, else the machine's memory
    durations: dict[str, float] = field(default_factory=dict)


@dataclass
class State:
    """What the stages share: the job's inputs, resolved up front, and what each stage leaves for the next."""

    job: CompressionJob
    ctx: Context
    job_id: str
    token: str | None
    clients: dict[str, Any]
    output: Output
    modifiers: list[Modifier]
    needs_data: bool
    work: Path
    device: torch.device
    started: float  # time.monotonic() when the job began
    answers_skipped: str | None = None  # the memory preflight found the whole model would not fit for the answers
    vllm: Vllm | None = None  # where the servable stage runs vLLM (spec.evaluation.servable)
    activations: ActivationStorage = "memory"  # where compression keeps calibration activations (the preflight's pick for auto)
    resumed: bool = False  # a model compressed for this very spec and source waits in scratch (known after fetch)
    source: str | None = None  # the source's identity: hub commit, S3 listing or folder digest
    model_dir: Path | None = None
    _tokenizer: Any = None
    text: str | None = None
    samples: list[torch.Tensor] = field(default_factory=list)
    original: Any = None
    before: dict[str, Any] = field(default_factory=dict)
    after: dict[str, Any] = field(default_factory=dict)
    served: Served | None = None
    served_nll: ServedNll | None = None
    result: ResultEvent | None = None

    @property
    def spec(self) -> JobSpec:
        return self.job.spec

    @property
    def staged(self) -> Path:
        return self.work / "model"

    @property
    def marker(self) -> Path:
        return self.work / COMPRESSED_MARKER

    @property
    def calibrating(self) -> bool:
        """Calibration data is made only for a compression that still has to happen, and only once."""
        return self.needs_data and not self.resumed and not self.samples

    @property
    def evaluating_original(self) -> bool:
        return self.evaluating and not self.before

    @property
    def self_generating(self) -> bool:
        return self.spec.calibration.dataset == SELF_GENERATED

    @property
    def evaluating(self) -> bool:
        evaluation = self.spec.evaluation
        return evaluation.perplexity is not None or bool(evaluation.prompts)

    def tokenizer(self) -> Any:
        """The model's tokenizer, loaded on first use."""
        if self._tokenizer is None:
            self._tokenizer = load_tokenizer(self.model_dir, self.spec.model.trust_remote_code)
        return self._tokenizer


@dataclass(frozen=True)
class Stage:
    """One step of a job.

    `skip` says when it has nothing to do: on resume, or when the spec asks for none of it.
    `clock` names the entry of the result's durations that its time adds to.
    """

    name: str
    run: Callable[[State], None]
    skip: Callable[[State], bool] = lambda state: False
    clock: str | None = None


def run_job(job: CompressionJob, ctx: Context) -> ResultEvent:
    """Run the job; return its result (raise ModelPressError for bad input, GateFailed)."""
    state = prepare(job, ctx)
    for stage in STAGES:
        if stage.skip(state):
            log.debug("stage %s: skipped", stage.name)
            continue
        log.debug("stage %s", stage.name)
        began = time.monotonic()
        stage.run(state)
        if stage.clock is not None:
            ctx.durations[stage.clock] = ctx.durations.get(stage.clock, 0.0) + time.monotonic() - began
    assert state.result is not None
    state.result.durations_s = _durations(state)
    return state.result


def prepare(job: CompressionJob, ctx: Context) -> State:
    """Everything that can fail on bad input before any work: credentials, output, recipe."""
    started = time.monotonic()
    spec, env = job.spec, ctx.env
    require_gpu(env)
    vllm = find_vllm(env) if spec.evaluation.servable else None
    connections = _connections(spec, ctx)
    token = hf_token(spec.model.token_secret, env, ctx.objects)
    ctx.reporter.secrets = secret_values(list(connections.values()), token)
    clients = {role: refusing_permanently(s3_client(conn), spec, role) for role, conn in connections.items()}
    job_id = job_identity(job)
    output_uri = parse_uri(spec.output.uri)
    output = s3_output(clients["output"], spec.output.uri) if output_uri.scheme == "s3" else folder_output(
        local_path(output_uri, env), spec.output.uri)
    output.check(job_id, spec.output.overwrite)
    modifiers = job_recipe(spec.recipe, env, ctx.objects)
    needs_data = any(m.needs_data() for m in modifiers)
    if needs_data and spec.calibration.dataset is None:
        raise ModelPressError(f"spec.calibration.dataset: the recipe needs calibration data; give a dataset or {SELF_GENERATED}")
    device = torch.device(ctx.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    answers_skipped, activations = memory_preflight(spec, modifiers, device, clients, token, ctx)
    work = ctx.scratch / job_id.replace("/", "_")
    work.mkdir(parents=True, exist_ok=True)
    return State(job=job, ctx=ctx, job_id=job_id, token=token, clients=clients, output=output, modifiers=modifiers,
                 needs_data=needs_data, work=work, device=device, started=started, answers_skipped=answers_skipped, vllm=vllm,
                 activations=activations)


def memory_preflight(spec: JobSpec, modifiers: list[Modifier], device: torch.device, clients: dict[str, Any], token: str | None,
                     ctx: Context) -> tuple[str | None, ActivationStorage]:
    """The job's memory estimate from the model's config.json alone, before any download: reported
    in the first progress event, and a job that would not fit refused with the settings that would.
    Returns why the answers will be skipped, if they will, and where compression keeps the
    calibration activations (`auto`: the first storage that fits; memory when nothing is known)."""
    asked = spec.calibration.activation_storage
    unknown: ActivationStorage = "memory" if asked == "auto" else asked
    config = source_config(spec.model.uri, spec.model.revision, token, clients.get("model"), ctx.env)
    if config is None:
        return None, unknown
    try:
        shape = Shape.from_config(config)
    except NoShape as err:
        log.warning("no memory estimate: %s", err)
        return None, unknown
    limit = ctx.memory_limit if ctx.memory_limit is not None else memory_limit()
    kv_cache = kv_cache_gib(ctx.env) if spec.evaluation.servable else 0.0
    found = verdict(shape, job_work(spec, modifiers, on_host=device.type == "cpu", kv_cache_gib=kv_cache), resident_bytes(), limit)
    ctx.reporter.memory(found.estimate)
    if found.problem is not None:
        raise ModelPressError(found.problem)
    return found.answers_skipped, found.activations


# --- the stages, in order --------------------------------------------------------------------------


def fetch(state: State) -> None:
    """A local model directory (the hub cache, a download into scratch, or the path/PVC itself) and what it is.

    A staged model is reused only when it was made from this very source: a source replaced since
    (a new commit, other ETags, other files) is compressed again.
    """
    spec, report = state.spec, state.ctx.reporter
    report.stage("fetch", uri=spec.model.uri)
    uri = parse_uri(spec.model.uri)
    if uri.scheme == "hf":
        state.model_dir = fetch_hub_model(spec.model.uri, spec.model.revision, state.token)
        state.source = f"hf:{uri.root}@{state.model_dir.name}"  # the snapshot folder is named after the commit
    elif uri.scheme == "s3":
        client = state.clients["model"]
        objects = list_objects(client, uri.root, uri.path)
        dest = state.work / "source"
        transfer = download_prefix(client, uri.root, uri.path, dest, report.byte_counter("fetch", sum(o["Size"] for o in objects.values())))
        report.emit(TransferEvent(stage="fetch", files=transfer.files, bytes=transfer.bytes,
                                  skipped_files=transfer.skipped_files, resumed_bytes=transfer.resumed_bytes))
        state.model_dir = dest
        state.source = f"s3:{listing_identity(objects)}"
    else:
        path = local_path(uri, state.ctx.env)
        if not (path / "config.json").is_file():
            raise ModelPressError(f"spec.model.uri: {uri} is not a model directory (no config.json there)")
        state.model_dir = path
        state.source = f"{uri.scheme}:{folder_identity(path)}"
    refuse_escaping_links(state.model_dir, "spec.model.uri")
    marker = state.marker
    state.resumed = marker.is_file() and marker.read_text() == reuse_key(spec, state.source) and state.staged.is_dir()
    state.samples = _kept(state, CALIBRATION) or []
    state.before = _kept(state, ORIGINAL_EVALUATION) or {}


def check_source(state: State) -> None:
    """A damaged or incomplete model stops here, before any compute: its config, every shard's header
    against the shard's size, its tokenizer files."""
    try:
        check_model_dir(state.model_dir, state.spec.model.trust_remote_code)
    except ModelPressError as err:
        raise ModelPressError(f"spec.model.uri: {str(err).removeprefix('model: ')}") from None


def load_evaluation_text(state: State) -> None:
    """The perplexity text, read before any model is loaded so a bad dataset fails early."""
    ppl = state.spec.evaluation.perplexity
    field_path = "spec.evaluation.perplexity.dataset"
    data = open_dataset(ppl.dataset, ppl.split, ppl.subset, field_path, _local_fetcher(state, field_path), state.token)
    text = evaluation_text(data, ppl.text_field, ppl.max_tokens * 16)
    if not text.strip():
        raise ModelPressError(f"{field_path}: holds no text; check textField and split")
    state.text = text


def calibration_data(state: State) -> None:
    """Calibration samples from a hub dataset or a file."""
    calib = state.spec.calibration
    state.ctx.reporter.stage("calibrate", dataset=calib.dataset)
    field_path = "spec.calibration.dataset"
    data = open_dataset(calib.dataset, calib.split, calib.subset, field_path, _local_fetcher(state, field_path), state.token)
    state.samples = calibration_set(data, state.tokenizer(), calib.num_samples, calib.max_sequence_length, calib.seed,
                                    calib.text_field, calib.messages_field)
    _keep(state, CALIBRATION, state.samples)


def load_original(state: State) -> None:
    """The original model, for self-generated data (and then for the original's answers too)."""
    state.original = load_model(state.model_dir, state.device, state.spec.model.trust_remote_code)


def self_generated_data(state: State) -> None:
    """Calibration samples the original model writes itself, for clusters with no dataset to read."""
    calib = state.spec.calibration
    report = state.ctx.reporter
    report.stage("calibrate", dataset=SELF_GENERATED)
    state.samples = self_generated(state.original, state.tokenizer(), calib.num_samples, calib.max_sequence_length, calib.seed,
                                   report.token_counter("calibrate"))
    _keep(state, CALIBRATION, state.samples)


def evaluate_original(state: State) -> None:
    state.ctx.reporter.stage("evaluate", model="original")
    state.before = evaluate(state, state.model_dir, state.original)
    _keep(state, ORIGINAL_EVALUATION, state.before)


def release_original(state: State) -> None:
    """Frees the original's memory before compression needs it."""
    state.original = None
    gc.collect()


def compress(state: State) -> None:
    """The compressed model into scratch; the marker, written last, says for which spec and source it was made.

    Finished layers are kept in scratch as they are done, so a retry after a kill continues at the
    first unfinished layer.
    """
    import datasets

    from modelpress.engine.oneshot import oneshot

    spec = state.spec
    state.ctx.reporter.stage("compress")
    state.marker.unlink(missing_ok=True)
    shutil.rmtree(state.staged, ignore_errors=True)
    samples = state.samples
    dataset = datasets.Dataset.from_dict({"input_ids": [s[0].tolist() for s in samples]}) if samples else None
    oneshot(
        model=state.model_dir,
        dataset=dataset,
        recipe=state.modifiers,
        num_calibration_samples=len(samples) or spec.calibration.num_samples,
        max_seq_length=spec.calibration.max_sequence_length,
        output_dir=state.staged,
        device=state.device,
        seed=spec.calibration.seed,
        trust_remote_code=spec.model.trust_remote_code,
        progress=state.ctx.reporter.engine_progress,
        resume_dir=state.work / "layers",
        activation_storage=state.activations,
        spill_dir=state.work / SPILLED,
    )
    state.marker.write_text(reuse_key(spec, state.source))


def evaluate_compressed(state: State) -> None:
    state.ctx.reporter.stage("evaluate", model="compressed")
    state.after = evaluate(state, state.staged)
    gc.collect()


def serve(state: State) -> None:
    """The staged output loaded by vLLM in its own process: answers to the prompts, and the token NLL of
    the very windows the compressed evaluation scored, for the gate to hold against transformers'."""
    spec, tokenizer = state.spec, state.tokenizer()
    state.ctx.reporter.stage("serve", model="compressed")
    gc.collect()
    if state.device.type == "cuda":
        torch.cuda.empty_cache()  # vLLM sizes its cache by the GPU memory free when it starts
    from modelpress.engine.streamed_eval import windows
    from modelpress.runner.evaluation import prompt_text

    window, positions = evaluation_window(state.staged)
    parts = [w[0].tolist() for w in windows(evaluation_ids(state), window)]
    chat = bool(tokenizer.chat_template)
    prompt_tokens = [len(tokenizer(prompt_text(tokenizer, p), add_special_tokens=not chat)["input_ids"]) for p in spec.evaluation.prompts]
    plan = driver_plan(state.staged, parts, list(spec.evaluation.prompts), spec.evaluation.max_new_tokens, chat,
                       model_len(window, prompt_tokens, spec.evaluation.max_new_tokens, positions), state.work / "vllm" / "logs")
    report, failure = run_driver(state.vllm, plan, state.work / "vllm", state.ctx.env)
    state.served, state.served_nll = served_outcome(report, failure, state.vllm.version, list(spec.evaluation.prompts),
                                                    math.log(state.after["perplexity"]))


def gate(state: State) -> None:
    """The result, and the quality gate: a model past `maxPerplexityIncrease`, or one vLLM does not serve as
    transformers reads it (`servable`), is never published."""
    names = [type(m).__name__ for m in state.modifiers]
    result = build_result(state.job, state.model_dir, state.staged, state.before, state.after, names,
                          state.resumed, state.needs_data, state.served, state.served_nll)
    state.result = result
    verdict = result.metrics.gate
    problems = []
    if verdict is not None and not verdict.passed:
        problems.append(f"perplexity rose {result.metrics.perplexity_increase_percent:.1f}%, past the "
                        f"{verdict.max_perplexity_increase}% allowed by spec.evaluation.maxPerplexityIncrease")
    if state.served is not None and (problem := served_problem(state.served, state.served_nll)) is not None:
        problems.append(f"spec.evaluation.servable: {problem}")
    if problems:
        result.durations_s = _durations(state)
        raise GateFailed(f"{'; '.join(problems)}; nothing was published", result)


def write_model_card(state: State) -> None:
    head = untied_head_bytes(state.model_dir, state.staged) if state.model_dir is not None else None
    (state.staged / "README.md").write_text(model_card(state.job, state.result, recipe_yaml(state.modifiers), head))


def untied_head_bytes(source: Path, output: Path) -> int | None:
    """The bytes of the output's head tensors when the source ties its head to the embeddings and
    the output does not (rotations untie them); None otherwise."""
    def tied(model_dir: Path) -> bool:
        return bool(json.loads((model_dir / "config.json").read_text(encoding="utf-8")).get("tie_word_embeddings", True))

    if not tied(source) or tied(output):
        return None
    entries = {name: entry for file in shard_files(output) for name, entry in read_header(file).items()}
    return sum(length for name, (_, _, _, length) in entries.items() if name.startswith("lm_head.")) or None


def publish(state: State) -> None:
    """The staged model to the output, manifest last; scratch is emptied once it is there."""
    result, report = state.result, state.ctx.reporter
    report.stage("publish", uri=state.spec.output.uri)
    manifest = build_manifest(state.staged, job_ref(state.job).model_dump(exclude_none=True), result.versions)
    transfer = state.output.publish(state.staged, manifest, state.job_id, state.spec.output.overwrite,
                                    report.byte_counter("publish", manifest["totalBytes"]))
    result.output.files = len(manifest["files"])
    result.output.uploaded_bytes = transfer.bytes
    shutil.rmtree(state.work, ignore_errors=True)


STAGES = (
    Stage("fetch", fetch, clock="fetch"),
    Stage("check source", check_source),
    Stage("evaluation text", load_evaluation_text, skip=lambda s: s.spec.evaluation.perplexity is None),
    Stage("calibration data", calibration_data, skip=lambda s: not s.calibrating or s.self_generating, clock="calibrate"),
    Stage("original model", load_original, skip=lambda s: not (s.calibrating and s.self_generating)),
    Stage("self-generated data", self_generated_data, skip=lambda s: not (s.calibrating and s.self_generating), clock="calibrate"),
    Stage("original evaluation", evaluate_original, skip=lambda s: not s.evaluating_original, clock="evaluate"),
    Stage("release original", release_original, skip=lambda s: s.original is None),
    Stage("compress", compress, skip=lambda s: s.resumed, clock="compress"),
    Stage("compressed evaluation", evaluate_compressed, skip=lambda s: not s.evaluating, clock="evaluate"),
    Stage("serve", serve, skip=lambda s: s.vllm is None, clock="serve"),
    Stage("gate", gate),
    Stage("model card", write_model_card),
    Stage("publish", publish, clock="publish"),
)


# --- helpers -----------------------------------------------------------------------------------------


def _connections(spec: JobSpec, ctx: Context) -> dict[str, S3Connection]:
    """S3 connections by role, resolved before any work so missing credentials fail first."""
    return {
        use.role.name: s3_connection(use.role.name, use.secret, ctx.env, ctx.objects, use.role.connection_field)
        for use in connection_uses(spec)
        if use.needed
    }


def job_recipe(recipe: Recipe, env: Mapping[str, str], objects: LocalObjects) -> list[Modifier]:
    """The job's modifiers, from a preset, inline modifiers, or a ConfigMap's YAML."""
    try:
        if recipe.preset is not None:
            return parse_recipe(preset_document(recipe.preset, recipe.algorithm, recipe.ignore, recipe.group_size))
        if recipe.modifiers is not None:
            return parse_recipe(recipe.modifiers)
        return load_recipe(recipe_text(recipe.config_map, env, objects))
    except ModelPressError as err:
        message = str(err)
        raise ModelPressError(message if message.startswith("spec.") else f"spec.recipe: {message}") from None


def _local_fetcher(state: State, field_path: str) -> Callable[[str], Path]:
    """Maps a data URI to a local file: s3:// objects are downloaded (resumably) into scratch."""

    def local(text: str) -> Path:
        uri = parse_uri(text)
        if uri.scheme != "s3":
            return local_path(uri, state.ctx.env)
        client, key = state.clients["data"], uri.path
        found = list_objects(client, uri.root, key.rsplit("/", 1)[0] if "/" in key else "")
        meta = found.get(key.rsplit("/", 1)[-1])
        if meta is None:
            raise ModelPressError(f"{field_path}: {uri} does not exist; check the key and connection")
        try:
            target = confined(state.work / "data", key)
        except PathEscape:
            raise ModelPressError(f"{field_path}: {uri} names a key that leaves the scratch folder; rename the object") from None
        download_object(client, uri.root, key, meta["Size"], target, meta["ETag"], None, lambda n: None)
        return target

    return local


def load_model(path: Path, device: torch.device, trust_remote_code: bool) -> Any:
    """A model for evaluation; compressed checkpoints are dequantized on load."""
    from transformers import AutoModelForCausalLM, CompressedTensorsConfig

    warnings.filterwarnings("ignore", message="You passed `quantization_config`")
    config = json.loads((path / "config.json").read_text())
    extra = {"quantization_config": CompressedTensorsConfig(dequantize=True)} if "quantization_config" in config else {}
    model = AutoModelForCausalLM.from_pretrained(path, dtype="auto", trust_remote_code=trust_remote_code, **extra)
    return model.to(device).eval()


def evaluate(state: State, model_dir: Path, loaded: Any = None) -> dict[str, Any]:
    """Perplexity on the evaluation text, layer by layer from disk, and greedy answers to the spec's prompts.

    Perplexity needs one decoder layer of memory whatever the model's size. Answers need the whole
    model: they are given when the memory preflight found it fits under the memory limit, and
    otherwise skipped with the reason in the result.
    """
    from modelpress.engine.streamed_eval import streamed_perplexity
    from modelpress.runner.evaluation import answer

    spec, tokenizer = state.spec, state.tokenizer()
    out: dict[str, Any] = {}
    if state.text is not None:
        window, _ = evaluation_window(model_dir)
        out["perplexity"] = streamed_perplexity(model_dir, evaluation_ids(state), window, state.device, spec.model.trust_remote_code)
    if not spec.evaluation.prompts:
        return out
    if loaded is None and state.answers_skipped is not None:
        out["answers_skipped"] = state.answers_skipped
        return out
    model = loaded if loaded is not None else load_model(model_dir, state.device, spec.model.trust_remote_code)
    out["answers"] = [answer(model, tokenizer, p, spec.evaluation.max_new_tokens) for p in spec.evaluation.prompts]
    return out


def evaluation_ids(state: State) -> torch.Tensor:
    """The evaluation tokens: the first `maxTokens` of the perplexity text, scored by transformers and by vLLM alike."""
    ids = state.tokenizer()(state.text, return_tensors="pt")["input_ids"][0]
    return ids[: state.spec.evaluation.perplexity.max_tokens]


def evaluation_window(model_dir: Path) -> tuple[int, int]:
    """Tokens per scored window (512, or the model's positions when fewer), and the model's positions."""
    positions = json.loads((model_dir / "config.json").read_text()).get("max_position_embeddings") or 512
    return min(512, positions), positions


def _kept(state: State, name: str) -> Any:
    """What an earlier try of this job computed and kept in scratch, if it was for the same spec and source."""
    path = state.work / f"{name}.pt"
    if not path.is_file():
        return None
    body = torch.load(path, weights_only=True)
    return body["value"] if body["key"] == _kept_key(state, name) else None


def _keep(state: State, name: str, value: Any) -> None:
    """Kept whole or not at all, so a retry never reads half a file."""
    tmp = state.work / f".{name}.tmp"
    torch.save({"key": _kept_key(state, name), "value": value}, tmp)
    tmp.replace(state.work / f"{name}.pt")


def _kept_key(state: State, name: str) -> str:
    """The original's evaluation depends on the evaluation settings too; the calibration samples do not."""
    extra = state.spec.evaluation.model_dump_json() if name == ORIGINAL_EVALUATION else ""
    return reuse_key(state.spec, f"{state.source}\n{extra}")


def _durations(state: State) -> dict[str, float]:
    """Seconds by stage, and in all so far."""
    return {**{k: round(v, 2) for k, v in state.ctx.durations.items()}, "total": round(time.monotonic() - state.started, 2)}
