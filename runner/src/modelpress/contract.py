"""The CompressionJob: the contract between the operator, the runner and the user.

One pydantic model, shared by the runner (which executes a job) and the operator (which builds
the CRD's OpenAPI schema from it and validates custom resources against it). It imports no torch.

    apiVersion: modelpress.dev/v1alpha1
    kind: CompressionJob
    metadata: {name: smollm2-w4a16}
    spec:
      model: {uri: hf://HuggingFaceTB/SmolLM2-135M-Instruct}
      recipe: {preset: W4A16, algorithm: GPTQ}
      calibration: {dataset: self-generated, numSamples: 64}
      output: {uri: s3://models/smollm2-w4a16, connection: models-s3}

Field names are camelCase on the wire. `parse_job` validates a whole document and reports every
problem at once, each naming its field path (`spec.calibration.numSamples: must be ≥ 1`).

How the runner pod is given the job (the operator builds the pod this way):

- The whole CompressionJob document as JSON in env `MODELPRESS_SPEC`, or in a file named by
  `MODELPRESS_SPEC_FILE` (a mounted ConfigMap). Secrets never go into the spec.
- S3 connections (OpenShift AI connection Secrets: `AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY`,
  `AWS_S3_ENDPOINT`, `AWS_S3_BUCKET`, `AWS_DEFAULT_REGION`) arrive as env vars, each key prefixed by
  the role of the connection, since the keys of two connections collide:
  `MODEL_` for `spec.model.connection`, `DATA_` for `spec.calibration.connection` (calibration and
  evaluation datasets on S3), `OUTPUT_` for `spec.output.connection`; e.g. `OUTPUT_AWS_S3_ENDPOINT`.
  A role with no prefixed variable falls back to the plain `AWS_*` variables (a workbench's
  `envFrom`). Optional per role: `<ROLE>_AWS_CA_BUNDLE` (else `AWS_CA_BUNDLE`), and the connection
  keys `AWS_S3_USE_PATH_STYLE` / `AWS_S3_VERIFY_SSL`.
- The Hugging Face token (`spec.model.tokenSecret`) as env `HF_TOKEN`.
- A recipe from `spec.recipe.configMap` as a file named by env `MODELPRESS_RECIPE_FILE`.
- Scratch space (downloads, the compressed model before upload): env `MODELPRESS_SCRATCH`.
- PVCs named by `pvc://claim/path` are mounted at `$MODELPRESS_PVC_ROOT/<claim>` (default
  `/mnt/pvc/<claim>`), read-only for the model and read-write for the output.
- The result goes to the termination-message path, env `MODELPRESS_TERMINATION_LOG`
  (default `/dev/termination-log`).

Exit codes: 0 success, 2 invalid spec or input (permanent: fail the Job), 3 the quality gate
failed (permanent), 1 any other failure (may be retried). Progress is one JSON object per line on
stdout: `{"event": "progress", "stage": ..., "percent": ..., ...}`; the last line is
`{"event": "result", ...}`.
"""

from typing import Annotated, Any, Literal, get_args

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError, model_validator
from pydantic.alias_generators import to_camel

API_VERSION = "modelpress.dev/v1alpha1"
KIND = "CompressionJob"

# Kubernetes object names (DNS-1123 subdomain) and label-ish keys.
K8S_NAME = r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$"
SECRET_KEY = r"^[-._a-zA-Z0-9]+$"
QUANTITY = r"^[0-9]+(\.[0-9]+)?(m|k|M|G|T|P|E|Ki|Mi|Gi|Ti|Pi|Ei)?$"
URI_SCHEMES = ("hf://", "s3://", "pvc://")
SELF_GENERATED = "self-generated"

Name = Annotated[str, Field(min_length=1, max_length=253, pattern=K8S_NAME)]
Short = Annotated[str, Field(min_length=1, max_length=256)]
Uri = Annotated[str, Field(min_length=1, max_length=1024)]
Quantity = Annotated[str, Field(min_length=1, max_length=32, pattern=QUANTITY)]
LabelMap = Annotated[dict[Annotated[str, Field(max_length=317)], Annotated[str, Field(max_length=1024)]], Field(max_length=64)]


class SpecProblem(ValueError):
    """A cross-field rule broken at `field` (relative to the model that checks it)."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(message)
        self.field = field


class InvalidSpec(ValueError):
    """A CompressionJob that does not validate; `problems` lists every one, each naming its field."""

    def __init__(self, problems: list[str]) -> None:
        more = f" (and {len(problems) - 1} more problem(s))" if len(problems) > 1 else ""
        super().__init__(f"{problems[0]}{more}")
        self.problems = problems


class Strict(BaseModel):
    """camelCase on the wire, snake_case in Python; unknown fields are errors."""

    model_config = ConfigDict(extra="forbid", alias_generator=to_camel, populate_by_name=True, frozen=True)


def _check_uri(value: str, allowed: tuple[str, ...]) -> str:
    if "://" in value and not value.startswith(allowed):
        raise ValueError(f"unsupported scheme; use {', '.join(s + '…' for s in allowed)} or a path")
    for scheme in allowed:
        if value.startswith(scheme):
            rest = value[len(scheme) :]
            if not rest.split("/", 1)[0]:
                raise ValueError(f"{scheme} needs a name after it, as in {scheme}name/path")
    return value


ModelUri = Annotated[Uri, AfterValidator(lambda v: _check_uri(v, URI_SCHEMES))]
OutputUri = Annotated[Uri, AfterValidator(lambda v: _check_uri(v, ("s3://", "pvc://")))]
DataUri = Annotated[Uri, AfterValidator(lambda v: _check_uri(v, ("hf://", "s3://")))]


class KeyRef(Strict):
    """A key of a Secret or ConfigMap in the job's namespace."""

    name: Name
    key: Annotated[str, Field(min_length=1, max_length=253, pattern=SECRET_KEY)]


class ModelSource(Strict):
    uri: ModelUri = Field(description="hf://org/name, s3://bucket/prefix, pvc://claim/path, or a local path")
    revision: Short | None = Field(None, description="hub branch, tag or commit (hf:// only)")
    connection: Name | None = Field(None, description="OpenShift AI S3 connection Secret (s3:// only)")
    token_secret: KeyRef | None = Field(None, description="Secret key holding HF_TOKEN (hf:// only)")
    trust_remote_code: bool = Field(False, description="run the model repository's own Python code")

    @model_validator(mode="after")
    def _fits_scheme(self) -> "ModelSource":
        if self.revision is not None and not self.uri.startswith("hf://"):
            raise SpecProblem("revision", "only applies to hf:// models; remove it")
        if self.token_secret is not None and not self.uri.startswith("hf://"):
            raise SpecProblem("tokenSecret", "only applies to hf:// models; remove it")
        if self.connection is not None and not self.uri.startswith("s3://"):
            raise SpecProblem("connection", "only applies to s3:// models; remove it")
        return self


# Quantization schemes, as llm-compressor names them.
Preset = Literal["W4A16", "W4A16_ASYM", "W8A16", "W8A8", "FP8", "FP8_DYNAMIC"]
Algorithm = Literal["RTN", "GPTQ", "AWQ", "SmoothQuant+GPTQ", "SparseGPT+GPTQ"]
PRESETS: tuple[str, ...] = get_args(Preset)
ALGORITHMS: tuple[str, ...] = get_args(Algorithm)
# RTN reads calibration data only for static activation scales; every other algorithm always does.
STATIC_ACTIVATION_PRESETS = {"FP8"}


class Recipe(Strict):
    """Exactly one of: a preset scheme (with an algorithm), llm-compressor modifiers, or a ConfigMap."""

    preset: Preset | None = None
    algorithm: Algorithm = "GPTQ"
    group_size: Annotated[int, Field(ge=8, le=4096)] | None = Field(None, description="override the preset's group size")
    ignore: Annotated[list[Short], Field(max_length=256)] = Field(
        default_factory=lambda: ["lm_head"], description="modules left in full precision (names, re: patterns)"
    )
    modifiers: Annotated[dict[str, Any], Field(max_length=32)] | None = Field(
        None, description="an llm-compressor recipe: stages of modifier groups"
    )
    config_map: KeyRef | None = Field(None, description="ConfigMap key holding a recipe YAML")

    @model_validator(mode="after")
    def _exactly_one(self) -> "Recipe":
        given = [n for n, v in (("preset", self.preset), ("modifiers", self.modifiers), ("configMap", self.config_map)) if v is not None]
        if len(given) != 1:
            found = f"found {', '.join(given)}" if given else "found none"
            raise SpecProblem("", f"give exactly one of preset, modifiers or configMap ({found})")
        if self.preset is None:
            for name in sorted(self.model_fields_set & {"algorithm", "group_size", "ignore"}):
                raise SpecProblem(to_camel(name), "only applies to a preset; set it inside the recipe instead")
        return self

    def needs_data(self) -> bool | None:
        """Whether the recipe reads calibration data; None when only the recipe itself can tell."""
        if self.preset is None:
            return None
        return self.algorithm != "RTN" or self.preset in STATIC_ACTIVATION_PRESETS


class Calibration(Strict):
    dataset: DataUri | None = Field(
        None, description="hf://name, s3://bucket/key, a .jsonl/.parquet/.txt path, or self-generated"
    )
    connection: Name | None = Field(None, description="S3 connection for s3:// calibration and evaluation data")
    split: Short = "train"
    subset: Short | None = Field(None, description="the hub dataset's configuration name")
    text_field: Short = "text"
    messages_field: Short = Field("messages", description="chat messages, rendered with the chat template")
    num_samples: Annotated[int, Field(ge=1, le=100_000)] = 512
    max_sequence_length: Annotated[int, Field(ge=16, le=131_072)] = 2048
    seed: Annotated[int, Field(ge=0, le=2**31 - 1)] = 42


class Perplexity(Strict):
    dataset: DataUri = Field(description="text for perplexity: hf://name, s3://bucket/key or a .txt/.jsonl/.parquet path")
    split: Short = "test"
    subset: Short | None = None
    text_field: Short = "text"
    max_tokens: Annotated[int, Field(ge=64, le=1_000_000)] = 8192


class Evaluation(Strict):
    perplexity: Perplexity | None = None
    prompts: Annotated[list[Annotated[str, Field(min_length=1, max_length=4096)]], Field(max_length=32)] = Field(
        default_factory=list, description="answered greedily by the original and the compressed model"
    )
    max_new_tokens: Annotated[int, Field(ge=1, le=1024)] = 64
    max_perplexity_increase: Annotated[float, Field(ge=0, le=1000)] | None = Field(
        None, description="fail the job when compressed perplexity exceeds the original's by more than this percent"
    )

    @model_validator(mode="after")
    def _gate_needs_perplexity(self) -> "Evaluation":
        if self.max_perplexity_increase is not None and self.perplexity is None:
            raise SpecProblem("maxPerplexityIncrease", "needs evaluation.perplexity to measure; add it or remove the gate")
        return self


class Output(Strict):
    uri: OutputUri = Field(description="s3://bucket/prefix, pvc://claim/path, or a local path")
    connection: Name | None = Field(None, description="OpenShift AI S3 connection Secret (s3:// only)")
    overwrite: bool = Field(False, description="replace a model already at uri")

    @model_validator(mode="after")
    def _fits_scheme(self) -> "Output":
        if self.connection is not None and not self.uri.startswith("s3://"):
            raise SpecProblem("connection", "only applies to s3:// outputs; remove it")
        return self


class Toleration(Strict):
    key: Annotated[str, Field(max_length=317)] | None = None
    operator: Literal["Exists", "Equal"] | None = None
    value: Annotated[str, Field(max_length=256)] | None = None
    effect: Literal["NoSchedule", "PreferNoSchedule", "NoExecute"] | None = None
    toleration_seconds: Annotated[int, Field(ge=0)] | None = None


class Resources(Strict):
    cpu: Quantity = "4"
    memory: Quantity = "16Gi"
    gpus: Annotated[int, Field(ge=0, le=16)] = 0
    gpu_resource: Annotated[str, Field(max_length=253)] = "nvidia.com/gpu"
    scratch: Quantity = Field("50Gi", description="scratch volume for the download and the compressed model")
    shm: Quantity = Field("2Gi", description="size of /dev/shm")


class Runtime(Strict):
    """How the operator runs the pod; the runner itself reads none of it."""

    image: Annotated[str, Field(max_length=512)] | None = Field(None, description="runner image (default: the operator's)")
    resources: Resources = Field(default_factory=Resources)
    node_selector: LabelMap | None = None
    tolerations: Annotated[list[Toleration], Field(max_length=32)] = Field(default_factory=list)
    affinity: Annotated[dict[str, Any], Field(max_length=3)] | None = Field(None, description="a core/v1 Affinity")
    priority_class_name: Name | None = None
    service_account_name: Name | None = None
    backoff_limit: Annotated[int, Field(ge=0, le=10)] = 0
    active_deadline_seconds: Annotated[int, Field(ge=60)] | None = None
    ttl_seconds_after_finished: Annotated[int, Field(ge=0)] | None = None
    suspend: bool = False


class JobSpec(Strict):
    model: ModelSource
    recipe: Recipe
    calibration: Calibration = Field(default_factory=Calibration)
    evaluation: Evaluation = Field(default_factory=Evaluation)
    output: Output
    runtime: Runtime = Field(default_factory=Runtime)

    @model_validator(mode="after")
    def _cross_section(self) -> "JobSpec":
        if self.recipe.needs_data() and self.calibration.dataset is None:
            raise SpecProblem(
                "calibration.dataset",
                f"{self.recipe.algorithm} with {self.recipe.preset} needs calibration data; "
                f"give a dataset or {SELF_GENERATED}",
            )
        return self


class ObjectMeta(BaseModel):
    """The part of Kubernetes metadata the job reads; the API server's own fields pass through."""

    model_config = ConfigDict(extra="ignore", frozen=True)
    name: Name
    namespace: Name | None = None
    uid: Annotated[str, Field(max_length=64)] | None = None
    labels: LabelMap | None = None
    annotations: LabelMap | None = None


class CompressionJob(Strict):
    api_version: Literal["modelpress.dev/v1alpha1"]
    kind: Literal["CompressionJob"]
    metadata: ObjectMeta
    spec: JobSpec


def parse_job(document: Any) -> CompressionJob:
    """Validate a CompressionJob document; raise InvalidSpec listing every problem found."""
    try:
        return CompressionJob.model_validate(document)
    except ValidationError as err:
        raise InvalidSpec([describe(e) for e in err.errors()]) from None


def describe(error: Any) -> str:
    """One pydantic error as `field.path: what is wrong and how to fix it`."""
    loc = [str(p) for p in error["loc"]]
    cause = error.get("ctx", {}).get("error")
    if isinstance(cause, SpecProblem):
        loc += [p for p in cause.field.split(".") if p]
        message = str(cause)
    else:
        message = _message(error)
    return f"{'.'.join(loc) or '(document)'}: {message}"


def _message(error: Any) -> str:
    kind, ctx = error["type"], error.get("ctx", {})
    if kind == "missing":
        return "required; add it"
    if kind == "extra_forbidden":
        return "unknown field; check its spelling (fields are camelCase)"
    if kind in ("greater_than_equal", "less_than_equal", "greater_than", "less_than"):
        sign = {"greater_than_equal": "≥", "less_than_equal": "≤", "greater_than": ">", "less_than": "<"}[kind]
        bound = next(iter(ctx.values()))
        return f"must be {sign} {bound} (got {error['input']!r})"
    if kind in ("enum", "literal_error"):
        return f"must be one of {ctx.get('expected')} (got {error['input']!r})"
    if kind == "string_pattern_mismatch":
        return f"{error['input']!r} is not valid here; {_PATTERN_HINTS.get(ctx.get('pattern'), 'check its format')}"
    if kind in ("string_too_long", "too_long"):
        return f"too long; at most {ctx.get('max_length')} {'characters' if kind.startswith('string') else 'entries'}"
    if kind in ("string_too_short", "too_short"):
        return "must not be empty"
    if kind == "value_error":
        return str(ctx.get("error", error["msg"]))
    return error["msg"][:1].lower() + error["msg"][1:]


_PATTERN_HINTS = {
    K8S_NAME: "use a Kubernetes name (lower-case letters, digits, '-' and '.')",
    SECRET_KEY: "use letters, digits, '-', '_' and '.'",
    QUANTITY: "use a Kubernetes quantity such as 4, 500m, 16Gi",
}

