"""The contract between the operator, the runner and the user, in one torch-free module.

Both sides import it, so a value the other side must agree on is written down once, here:

- the CompressionJob model (`parse_job`), from which the operator also builds the CRD;
- `ExitCode`, the runner's exit codes, which the Job's pod failure policy and the status read;
- `PodPath` and `Env`: where the pod keeps things and the variables that name them;
- the OpenShift AI S3 connection keys (`S3Key`) and the role prefixes (`ROLES`) that keep the
  keys of two connections apart in one pod;
- `Uri` and `parse_uri`, the one parser of model, data and output locations;
- the events the runner writes (`ProgressEvent`, `StageEvent`, `TransferEvent`, `ResultEvent`,
  `FailureEvent`) and `parse_event`, with which the operator reads them back; the memory preflight's
  estimate (`MemoryEstimate`) rides on the first progress event.

    apiVersion: modelpress.dev/v1alpha1
    kind: CompressionJob
    metadata: {name: smollm2-w4a16}
    spec:
      model: {uri: hf://HuggingFaceTB/SmolLM2-135M-Instruct}
      recipe: {preset: W4A16, algorithm: GPTQ}
      calibration: {dataset: self-generated, numSamples: 64}
      output: {uri: s3://models/smollm2-w4a16, connection: models-s3}

Field names are camelCase on the wire, in the spec and in the events alike. `parse_job`
validates a whole document and reports every problem at once, each naming its field path
(`spec.calibration.numSamples: must be ≥ 1`), cross-field rules included; a value shaped like a
secret is never echoed back. Free-form trees (`spec.recipe.modifiers`, `spec.runtime.affinity`) are
bounded by `tree_problem` before anything walks them.

How the runner pod is given the job (the operator builds the pod this way):

- The whole CompressionJob document as JSON in `Env.SPEC`, or in a file named by `Env.SPEC_FILE`
  (a mounted ConfigMap). Secrets never go into the spec.
- Each S3 connection's keys (`S3Key`) arrive as env vars prefixed by the role of the connection
  (`ROLES`), since the keys of two connections collide. A role with no prefixed variable falls
  back to the plain variables (a workbench's `envFrom`); the CA bundle falls back on its own.
- The Hugging Face token (`spec.model.tokenSecret`) as `Env.HF_TOKEN`.
- A recipe from `spec.recipe.configMap` as a file named by `Env.RECIPE_FILE`.
- Scratch space (downloads, the compressed model before upload) named by `Env.SCRATCH`.
- PVCs named by `pvc://claim/path` are mounted at `pvc_mount(claim)` under `Env.PVC_ROOT`,
  read-only for the model and read-write for the output.
- The last event goes to the termination-message path named by `Env.TERMINATION_LOG`.
- A pod given GPUs gets their number in `Env.GPUS`; the runner refuses a torch that cannot use them.

Progress is one event per line on stdout; the last line, also written to the termination
message, is a `ResultEvent` or a `FailureEvent`.
"""

import dataclasses
import math
import re
from collections.abc import Mapping
from enum import IntEnum
from typing import Annotated, Any, Literal, get_args

from pydantic import (AfterValidator, AliasChoices, BaseModel, BeforeValidator, ConfigDict, Field, ModelWrapValidatorHandler,
                      TypeAdapter, ValidationError, model_validator)
from pydantic.alias_generators import to_camel
from pydantic_core import InitErrorDetails, PydanticCustomError

API_VERSION = "modelpress.dev/v1alpha1"
KIND = "CompressionJob"

# Kubernetes object names (DNS-1123 subdomain) and label-ish keys.
K8S_NAME = r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$"
SECRET_KEY = r"^[-._a-zA-Z0-9]+$"
QUANTITY = r"^[0-9]+(\.[0-9]+)?(m|k|M|G|T|P|E|Ki|Mi|Gi|Ti|Pi|Ei)?$"
SELF_GENERATED = "self-generated"
MIN_SEQUENCE_LENGTH = 16  # calibration.maxSequenceLength, at least
MIN_PERPLEXITY_TOKENS = 64  # evaluation.perplexity.maxTokens, at least
# Where calibration activations are kept while layers are compressed (engine/activations.py);
# `auto` lets the runner's memory preflight pick the first of the others that fits.
ActivationStorage = Literal["memory", "bfloat16", "float16", "disk"]
ActivationStorageChoice = Literal["auto", "memory", "bfloat16", "float16", "disk"]

Name = Annotated[str, Field(min_length=1, max_length=253, pattern=K8S_NAME)]
Short = Annotated[str, Field(min_length=1, max_length=256)]
UriText = Annotated[str, Field(min_length=1, max_length=1024)]
Quantity = Annotated[str, Field(min_length=1, max_length=32, pattern=QUANTITY)]
LabelMap = Annotated[dict[Annotated[str, Field(max_length=317)], Annotated[str, Field(max_length=1024)]], Field(max_length=64)]


@dataclasses.dataclass(frozen=True)
class SpecProblem:
    """A cross-field rule broken at `field` (dotted, relative to the model whose rule it is)."""

    field: str
    message: str


class InvalidSpec(ValueError):
    """A CompressionJob that does not validate; `problems` lists every one, each naming its field."""

    def __init__(self, problems: list[str]) -> None:
        more = f" (and {len(problems) - 1} more problem(s))" if len(problems) > 1 else ""
        super().__init__(f"{problems[0]}{more}")
        self.problems = problems


RULE_ERROR = "spec_rule"  # the pydantic error type of a broken cross-field rule


class Strict(BaseModel):
    """camelCase on the wire, snake_case in Python; unknown fields are errors.

    A model's cross-field rules (`rules`) read the raw input, so they run even when some of its
    fields fail: every problem of a document comes out in one validation, not one per try.
    """

    model_config = ConfigDict(extra="forbid", alias_generator=to_camel, populate_by_name=True, frozen=True)

    @classmethod
    def rules(cls, data: Mapping[str, Any]) -> list[SpecProblem]:
        """The cross-field problems of the raw input `data` (a mapping; its fields not yet validated)."""
        return []

    @model_validator(mode="wrap")
    @classmethod
    def _fields_and_rules(cls, data: Any, handler: ModelWrapValidatorHandler["Strict"]) -> "Strict":
        if not isinstance(data, Mapping):  # a model instance, or not a mapping at all: pydantic says which
            return handler(data)
        broken = [_rule_error(tuple(p for p in problem.field.split(".") if p), problem.message, data) for problem in cls.rules(data)]
        try:
            model = handler(data)
        except ValidationError as err:
            if not broken:
                raise
            raise ValidationError.from_exception_data(err.title, [*map(_reraisable, err.errors()), *broken]) from None
        if broken:
            raise ValidationError.from_exception_data(cls.__name__, broken)
        return model


def _rule_error(loc: tuple[Any, ...], message: str, data: Any) -> InitErrorDetails:
    return InitErrorDetails(type=PydanticCustomError(RULE_ERROR, "{message}", {"message": message}), loc=loc, input=data)


def _reraisable(error: Any) -> Any:
    """A reported error as pydantic takes it back: a nested model's broken rule is rebuilt."""
    return _rule_error(error["loc"], error["msg"], error["input"]) if error["type"] == RULE_ERROR else error


def raw(data: Mapping[str, Any], name: str) -> Any:
    """A field of raw input by its wire (camelCase) or Python name; None when not given."""
    return data.get(to_camel(name), data.get(name))


def given(data: Mapping[str, Any], name: str) -> bool:
    return raw(data, name) is not None


# --- free-form trees and secret-shaped values ------------------------------------------------------
# YAML aliases share one object, so a few hundred bytes can stand for millions of values: a tree is
# measured as it would be walked, every use of an alias counted, and the count stops at the bound.

MAX_TREE_VALUES = 10_000
MAX_TREE_DEPTH = 32
MAX_TREE_TEXT = 1 << 20  # characters of keys and strings, with each use of an alias counted


def tree_problem(value: Any) -> str | None:
    """Why a parsed YAML/JSON tree is too large to walk, or None; costs at most the bounds, never the expansion."""
    limits = (f"at most {MAX_TREE_VALUES} values (each use of a YAML alias counts), nested at most {MAX_TREE_DEPTH} deep, "
              f"with at most {MAX_TREE_TEXT} characters of text")
    stack, values, text = [(value, 1)], 1, 0
    while stack:
        node, depth = stack.pop()
        if isinstance(node, str):
            text += len(node)
            if text > MAX_TREE_TEXT:
                return f"too much text; {limits}"
            continue
        if not isinstance(node, (dict, list, tuple)):
            continue
        if depth > MAX_TREE_DEPTH:
            return f"too deeply nested; {limits}"
        values += 2 * len(node) if isinstance(node, dict) else len(node)
        if values > MAX_TREE_VALUES:
            return f"too many values; {limits}"
        items = (part for pair in node.items() for part in pair) if isinstance(node, dict) else node
        stack.extend((item, depth + 1) for item in items if isinstance(item, (dict, list, tuple, str)))
    return None


def _bounded(value: Any) -> Any:
    problem = tree_problem(value)
    if problem is not None:
        raise ValueError(problem)
    return value


# Known token prefixes (Hugging Face, AWS key ids, GitHub, OpenAI-style, Slack), then the shape of a
# generated key: base64 characters unbroken by the separators names are made of, 32 or more of them,
# or 16 with several digits among the letters or upper and lower case about evenly (CamelCase has
# few capitals).
_SECRET_PREFIX = re.compile(r"^(hf_|api_|AKIA|ASIA|ghp_|gho_|ghs_|github_pat_|sk-|xox[abposr]-)")
_KEY_RUN = re.compile(r"[A-Za-z0-9+/=_.-]+")
_KEY_WORD = re.compile(r"[A-Za-z0-9+/]{16,}")


def secret_like(text: str) -> bool:
    """Whether `text` holds something shaped like a token or key, so an error message must not repeat it."""
    for run in _KEY_RUN.findall(text):
        if _SECRET_PREFIX.match(run) and len(run) >= 12:
            return True
        for word in _KEY_WORD.findall(run):
            digits, upper, lower = (sum(map(f, word)) for f in (str.isdigit, str.isupper, str.islower))
            if len(word) >= 32 or (digits >= 3 and upper + lower >= 3) or min(upper, lower) >= 0.35 * len(word):
                return True
    return False


HIDDEN = "a value shaped like a secret (not shown)"


QUANTITY_UNITS = {"": 1, "k": 10**3, "M": 10**6, "G": 10**9, "T": 10**12, "P": 10**15, "E": 10**18,
                  "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "Pi": 2**50, "Ei": 2**60}


def quantity_bytes(text: str) -> int:
    """A Kubernetes quantity of bytes (`8Gi`, `512M`, `1.5Gi`) as a number; ValueError when it is not one."""
    match = re.fullmatch(r"([0-9]+(?:\.[0-9]+)?)([kMGTPE]i?)?", text.strip())
    if match is None or (match.group(2) or "") not in QUANTITY_UNITS:
        raise ValueError(f"{text!r} is not a quantity of bytes like 8Gi or 512Mi")
    return int(float(match.group(1)) * QUANTITY_UNITS[match.group(2) or ""])


def human_bytes(n: int) -> str:
    """A size for people, in binary units."""
    if n <= 0:
        return "0 B"
    unit = min(int(math.log(n, 1024)), 4)
    return f"{n / 1024**unit:.1f} {['B', 'KiB', 'MiB', 'GiB', 'TiB'][unit]}"


def shown(value: Any) -> str:
    """A value as an error message may show it: scalars and short lists of them, never a secret-shaped one."""
    if value is None or isinstance(value, (bool, int, float)):
        return repr(value)
    if isinstance(value, str):
        return HIDDEN if secret_like(value) else repr(value if len(value) <= 80 else value[:77] + "...")
    if isinstance(value, (list, tuple)) and len(value) <= 16 and all(v is None or isinstance(v, (str, bool, int, float)) for v in value):
        return f"[{', '.join(map(shown, value))}]"
    return f"a {type(value).__name__}"


def key_shown(key: Any) -> str:
    """A mapping key or list index as a field path names it: plain text as it is, anything else in brackets."""
    if isinstance(key, int) and not isinstance(key, bool):
        return str(key)
    return key if isinstance(key, str) and key.isprintable() and shown(key) == repr(key) else f"[{shown(key)}]"


# --- the pod: exit codes, paths, environment, connections, URIs --------------------------------------


class ExitCode(IntEnum):
    """How the runner exits; the Job fails at once on a permanent code and may retry the others."""

    OK = 0
    RETRYABLE = 1  # anything unexpected: a network fault, a node going away
    INVALID_INPUT = 2  # the spec, or what it points at, is wrong: a retry cannot help
    QUALITY_GATE_FAILED = 3  # the compressed model is worse than spec.evaluation allows


PERMANENT_EXIT_CODES = (ExitCode.INVALID_INPUT, ExitCode.QUALITY_GATE_FAILED)


class PodPath:
    """Where the runner pod keeps things; the runner reads each one from its `Env` variable."""

    TERMINATION_LOG = "/dev/termination-log"
    PVC_ROOT = "/mnt/pvc"
    SCRATCH = "/scratch"
    RECIPE_DIR = "/etc/modelpress/recipe"  # where the recipe ConfigMap is mounted
    RECIPE_NAME = "recipe.yaml"  # the file the ConfigMap's key becomes there
    RECIPE_FILE = f"{RECIPE_DIR}/{RECIPE_NAME}"


class Env:
    """Names of the environment variables the operator sets and the runner reads."""

    SPEC = "MODELPRESS_SPEC"
    SPEC_FILE = "MODELPRESS_SPEC_FILE"
    SCRATCH = "MODELPRESS_SCRATCH"
    PVC_ROOT = "MODELPRESS_PVC_ROOT"
    TERMINATION_LOG = "MODELPRESS_TERMINATION_LOG"
    RECIPE_FILE = "MODELPRESS_RECIPE_FILE"
    HF_TOKEN = "HF_TOKEN"
    GPUS = "MODELPRESS_GPUS"  # the GPUs the pod was given: the runner then refuses a CPU-only torch
    VLLM_PYTHON = "MODELPRESS_VLLM_PYTHON"  # the interpreter of vLLM's own environment (spec.evaluation.servable)


# The operator's setting naming the runner image of jobs that ask for GPUs; the runner names it when
# a GPU job finds a CPU-only torch, since that setting (or spec.runtime.image) is the fix.
GPU_IMAGE_SETTING = "MODELPRESS_GPU_RUNNER_IMAGE"


def pvc_mount(claim: str, pvc_root: str = PodPath.PVC_ROOT) -> str:
    """Where the pod mounts a claim: the Job builder mounts it there and the runner looks there."""
    return f"{pvc_root.rstrip('/')}/{claim}"


class S3Key:
    """The keys of an OpenShift AI S3 connection Secret, and the CA bundle variable beside them.

    `CA_BUNDLE` is never read from a connection Secret in a pod (a path there names nothing the
    pod has): the operator sets it to the cluster's trusted bundle it mounts; on a laptop it
    comes from the environment, per role or plain.
    """

    ACCESS_KEY_ID = "AWS_ACCESS_KEY_ID"
    SECRET_ACCESS_KEY = "AWS_SECRET_ACCESS_KEY"
    ENDPOINT = "AWS_S3_ENDPOINT"
    BUCKET = "AWS_S3_BUCKET"
    REGION = "AWS_DEFAULT_REGION"
    USE_PATH_STYLE = "AWS_S3_USE_PATH_STYLE"
    VERIFY_SSL = "AWS_S3_VERIFY_SSL"
    CA_BUNDLE = "AWS_CA_BUNDLE"


# The operator checks a connection Secret holds these before it creates the Job.
S3_REQUIRED_KEYS = (S3Key.ACCESS_KEY_ID, S3Key.SECRET_ACCESS_KEY, S3Key.ENDPOINT)
# Keys that say which store and whose account: any one of them in plain env makes a connection.
S3_IDENTITY_KEYS = (*S3_REQUIRED_KEYS, S3Key.BUCKET, S3Key.REGION)
# Keys that only say how to reach the store; the bucket itself always comes from the s3:// URI.
S3_TRANSPORT_KEYS = (S3Key.USE_PATH_STYLE, S3Key.VERIFY_SSL)
S3_KEYS = (*S3_IDENTITY_KEYS, *S3_TRANSPORT_KEYS)


@dataclasses.dataclass(frozen=True)
class Role:
    """One use of an S3 connection: the env prefix of its keys and the spec field naming its Secret."""

    name: str
    prefix: str
    connection_field: str


ROLES = (
    Role("model", "MODEL_", "spec.model.connection"),
    Role("data", "DATA_", "spec.calibration.connection"),
    Role("output", "OUTPUT_", "spec.output.connection"),
)
ROLE = {role.name: role for role in ROLES}


Scheme = Literal["hf", "s3", "pvc", "local"]
REMOTE_SCHEMES: tuple[Scheme, ...] = ("hf", "s3", "pvc")


# The hub's repository ids: `name` or `org/name`, of letters, digits, `-`, `_` and `.`; S3 bucket names.
HUB_REPO = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,95}(/[A-Za-z0-9][A-Za-z0-9._-]{0,95})?")
BUCKET = re.compile(r"[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]")


class UnsupportedScheme(ValueError):
    """A URI whose scheme is none of REMOTE_SCHEMES."""


@dataclasses.dataclass(frozen=True)
class Uri:
    """A model, data or output location, parsed once by `parse_uri`.

    `root` is the hub repository id (hf), the bucket (s3) or the claim (pvc), empty for a local
    path; `path` is the key or prefix inside the bucket, the path inside the claim, or the local
    path itself.
    """

    scheme: Scheme
    root: str
    path: str
    text: str

    def __str__(self) -> str:
        return self.text


def uri_prefix(scheme: Scheme) -> str:
    """What a URI of `scheme` starts with: `s3://`."""
    return f"{scheme}://"


def parse_uri(text: str) -> Uri:
    """`s3://bucket/a/b` -> Uri("s3", "bucket", "a/b"); text without `://` is a local path.

    A remote location stays inside its bucket, claim or repository: no `..` segment, and a claim
    is a PVC name, so `pvc_mount(claim) / path` is always under the claim's mount.
    """
    if any(ord(c) < 32 or ord(c) == 127 for c in text):
        raise ValueError("holds a control character; remove it")
    scheme, sep, rest = text.partition("://")
    if not sep:
        return Uri("local", "", text, text)
    if scheme not in REMOTE_SCHEMES:
        raise UnsupportedScheme(f"unsupported scheme {shown(scheme + '://')}")
    head, _, tail = rest.partition("/")
    if head in ("", "."):
        raise ValueError(f"{scheme}:// needs a name after it, as in {scheme}://name/path")
    if ".." in rest.split("/"):
        raise ValueError(f"{scheme}:// locations may not hold '..'; name the place inside the {_ROOT_NAMES[scheme]} itself")
    if scheme == "hf":
        repo = rest.rstrip("/")
        if not HUB_REPO.fullmatch(repo) or "--" in repo:
            raise ValueError(f"{shown(repo)} is not a hub repository id; use hf://org/name")
        return Uri("hf", repo, "", text)
    if scheme == "pvc" and not re.match(K8S_NAME, head):
        raise ValueError("pvc:// needs a PVC name after it (lower-case letters, digits, '-' and '.'), as in pvc://claim/path")
    if scheme == "s3" and not BUCKET.fullmatch(head):
        raise ValueError(f"{shown(head)} is not an S3 bucket name (3-63 lower-case letters, digits, '-' and '.'); use s3://bucket/prefix")
    path = tail.strip("/")
    if "." in path.split("/"):
        raise ValueError(f"{scheme}:// locations may not hold '.' segments; name the place inside the {_ROOT_NAMES[scheme]} itself")
    return Uri(scheme, head, path, text)  # type: ignore[arg-type]


_ROOT_NAMES = {"hf": "repository", "s3": "bucket", "pvc": "claim"}


def scheme_of(text: str) -> Scheme:
    """The scheme of a URI the spec has already validated."""
    return parse_uri(text).scheme


def raw_scheme(value: Any) -> Scheme | None:
    """The scheme of a URI not yet validated; None when it is not one (its field says why)."""
    try:
        return parse_uri(value).scheme if isinstance(value, str) else None
    except ValueError:
        return None


def _check_uri(value: str, allowed: tuple[Scheme, ...]) -> str:
    """The spec's check of a URI: it parses, with a scheme this field takes."""
    hint = ", ".join(f"{uri_prefix(s)}…" for s in allowed if s != "local")
    try:
        scheme = parse_uri(value).scheme
    except UnsupportedScheme:
        scheme = None
    if scheme not in allowed:
        raise ValueError(f"unsupported scheme; use {hint} or a path")
    return value


# --- the CompressionJob -----------------------------------------------------------------------------

ModelUri = Annotated[UriText, AfterValidator(lambda v: _check_uri(v, ("hf", "s3", "pvc", "local")))]
OutputUri = Annotated[UriText, AfterValidator(lambda v: _check_uri(v, ("s3", "pvc", "local")))]
DataUri = Annotated[UriText, AfterValidator(lambda v: _check_uri(v, ("hf", "s3", "local")))]


class KeyRef(Strict):
    """A key of a Secret or ConfigMap in the job's namespace."""

    name: Name
    key: Annotated[str, Field(min_length=1, max_length=253, pattern=SECRET_KEY)]


class ModelSource(Strict):
    uri: ModelUri = Field(description="hf://org/name, s3://bucket/prefix, pvc://claim/path, or a local path")
    revision: Short | None = Field(None, description="hub branch, tag or commit (hf:// only)")
    connection: Name | None = Field(None, description="OpenShift AI S3 connection Secret (s3:// only)")
    token_secret: KeyRef | None = Field(None, description=f"Secret key holding {Env.HF_TOKEN} (hf:// only)")
    trust_remote_code: bool = Field(False, description="run the model repository's own Python code")

    @classmethod
    def rules(cls, data: Mapping[str, Any]) -> list[SpecProblem]:
        scheme = raw_scheme(raw(data, "uri"))
        return [SpecProblem(to_camel(name), f"only applies to {needs}:// models; remove it")
                for name, needs in (("revision", "hf"), ("token_secret", "hf"), ("connection", "s3"))
                if scheme is not None and given(data, name) and scheme != needs]


# Quantization schemes, as compressed-tensors names them (INT8 is its alias of W8A8). The engine
# accepts exactly these, so a preset the spec allows is one the engine writes.
Preset = Literal["W4A16", "W4A16_ASYM", "W8A16", "W8A8", "INT8", "FP8", "FP8_DYNAMIC"]
Algorithm = Literal["RTN", "GPTQ", "AWQ", "SmoothQuant+GPTQ", "SparseGPT+GPTQ"]
PRESETS: tuple[str, ...] = get_args(Preset)
ALGORITHMS: tuple[str, ...] = get_args(Algorithm)
# RTN reads calibration data only for static activation scales; every other algorithm always does.
STATIC_ACTIVATION_PRESETS = {"FP8"}
# Modules a preset leaves in full precision unless the job says otherwise.
DEFAULT_IGNORE = ("lm_head",)


class Recipe(Strict):
    """Exactly one of: a preset scheme (with an algorithm), llm-compressor modifiers, or a ConfigMap."""

    preset: Preset | None = None
    algorithm: Algorithm = "GPTQ"
    group_size: Annotated[int, Field(ge=8, le=4096)] | None = Field(None, description="override the preset's group size")
    ignore: Annotated[list[Short], Field(max_length=256)] = Field(
        default_factory=lambda: list(DEFAULT_IGNORE), description="modules left in full precision (names, re: patterns)"
    )
    modifiers: Annotated[dict[str, Any], Field(max_length=32), BeforeValidator(_bounded)] | None = Field(
        None, description="an llm-compressor recipe: stages of modifier groups"
    )
    config_map: KeyRef | None = Field(None, description="ConfigMap key holding a recipe YAML")

    @classmethod
    def rules(cls, data: Mapping[str, Any]) -> list[SpecProblem]:
        kinds = [to_camel(n) for n in ("preset", "modifiers", "config_map") if given(data, n)]
        if len(kinds) != 1:
            return [SpecProblem("", f"give exactly one of preset, modifiers or configMap (found {', '.join(kinds) or 'none'})")]
        return [SpecProblem(to_camel(n), "only applies to a preset; set it inside the recipe instead")
                for n in ("algorithm", "group_size", "ignore") if kinds != ["preset"] and (to_camel(n) in data or n in data)]

    def needs_data(self) -> bool | None:
        """Whether the recipe reads calibration data; None when only the recipe itself can tell."""
        return preset_needs_data(self.preset, self.algorithm)


def preset_needs_data(preset: str | None, algorithm: str) -> bool | None:
    """Whether a preset run by `algorithm` reads calibration data; None without a preset."""
    if preset is None:
        return None
    return algorithm != "RTN" or preset in STATIC_ACTIVATION_PRESETS


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
    max_sequence_length: Annotated[int, Field(ge=MIN_SEQUENCE_LENGTH, le=131_072)] = 2048
    seed: Annotated[int, Field(ge=0, le=2**31 - 1)] = 42
    activation_storage: ActivationStorageChoice = Field(
        "auto", description="where calibration activations are kept: memory, in 16 bits (bfloat16, float16), spilled to "
        "the scratch volume (disk), or auto: the first of those the memory estimate fits under the limit"
    )


class Perplexity(Strict):
    dataset: DataUri = Field(description="text for perplexity: hf://name, s3://bucket/key or a .txt/.jsonl/.parquet path")
    split: Short = "test"
    subset: Short | None = None
    text_field: Short = "text"
    max_tokens: Annotated[int, Field(ge=MIN_PERPLEXITY_TOKENS, le=1_000_000)] = 8192


# How far vLLM's token NLL of the evaluation text may be from transformers' on the same checkpoint and
# tokens, relative to transformers': |NLL_vllm - NLL_transformers| / NLL_transformers. The vLLM tier
# measured 0.01-0.16% on SmolLM2 in every scheme vLLM's CPU build serves (vLLM bf16, transformers
# fp32); the bound leaves twice that for bf16 rounding, far below what a wrongly read weight costs.
SERVED_NLL_BOUND = 0.003


class Evaluation(Strict):
    perplexity: Perplexity | None = None
    prompts: Annotated[list[Annotated[str, Field(min_length=1, max_length=4096)]], Field(max_length=32)] = Field(
        default_factory=list, description="answered greedily by the original and the compressed model"
    )
    max_new_tokens: Annotated[int, Field(ge=1, le=1024)] = 64
    max_perplexity_increase: Annotated[float, Field(ge=0, le=1000)] | None = Field(
        None, description="fail the job when compressed perplexity exceeds the original's by more than this percent"
    )
    servable: bool = Field(False, description=(
        f"load the output in vLLM before publishing: it answers the prompts and scores the perplexity text, and the job "
        f"fails unless vLLM loads it and its token NLL is within {100 * SERVED_NLL_BOUND:g}% of transformers' "
        f"(needs vLLM in the runner image, or {Env.VLLM_PYTHON})"))

    @classmethod
    def rules(cls, data: Mapping[str, Any]) -> list[SpecProblem]:
        problems = []
        if given(data, "max_perplexity_increase") and not given(data, "perplexity"):
            problems.append(SpecProblem("maxPerplexityIncrease", "needs evaluation.perplexity to measure; add it or remove the gate"))
        if raw(data, "servable") is True and not given(data, "perplexity"):
            problems.append(SpecProblem("servable", "needs evaluation.perplexity, the text vLLM and transformers both score; "
                                                    "add it or set servable: false"))
        return problems


class PublishConnection(Strict):
    """An OpenShift AI connection for the output, written by the operator once the job succeeds.

    It holds the output connection's keys with the output's bucket, so the dashboard, a workbench or
    an InferenceService reaches the model by the connection and the output's path alone.
    """

    name: Name | None = Field(None, description="the connection Secret's name (default: the CompressionJob's name)")
    display_name: Short | None = Field(None, description="the name the dashboard shows (default: the output's last path segment)")
    delete_with_job: bool = Field(False, description="delete the connection with the CompressionJob (by default it outlives the job)")


class Output(Strict):
    uri: OutputUri = Field(description="s3://bucket/prefix, pvc://claim/path, or a local path")
    connection: Name | None = Field(None, description="OpenShift AI S3 connection Secret (s3:// only)")
    overwrite: bool = Field(False, description="replace a model already at uri")
    publish_connection: PublishConnection | None = Field(None, description="after success, a connection for the output (s3:// only)")

    @classmethod
    def rules(cls, data: Mapping[str, Any]) -> list[SpecProblem]:
        scheme = raw_scheme(raw(data, "uri"))
        return [SpecProblem(to_camel(name), "only applies to s3:// outputs; remove it")
                for name in ("connection", "publish_connection") if given(data, name) and scheme is not None and scheme != "s3"]


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


AccessMode = Literal["ReadWriteOnce", "ReadWriteOncePod", "ReadWriteMany"]


class ScratchVolume(Strict):
    """The job's scratch claim: one for all its pod retries, so a retry resumes where the last pod stopped."""

    storage_class_name: Name | None = Field(None, description="storage class of the claim (default: the operator's, else the cluster's)")
    access_mode: AccessMode | None = Field(None, description="access mode of the claim (default: the operator's, else ReadWriteOnce)")
    delete_on_success: bool = Field(False, description="delete the claim once the job succeeded (it always goes with the CompressionJob)")


class Runtime(Strict):
    """How the operator runs the pod; the runner itself reads none of it."""

    image: Annotated[str, Field(max_length=512)] | None = Field(None, description="runner image (default: the operator's, its GPU image for a job with gpus)")
    resources: Resources = Field(default_factory=Resources)
    scratch_volume: ScratchVolume = Field(default_factory=ScratchVolume)
    node_selector: LabelMap | None = None
    tolerations: Annotated[list[Toleration], Field(max_length=32)] = Field(default_factory=list)
    affinity: Annotated[dict[str, Any], Field(max_length=3), BeforeValidator(_bounded)] | None = Field(
        None, description="a core/v1 Affinity"
    )
    priority_class_name: Name | None = None
    service_account_name: Name | None = None
    backoff_limit: Annotated[int, Field(ge=0, le=10)] = 0
    active_deadline_seconds: Annotated[int, Field(ge=60)] | None = Field(None, description="wall-clock cap of the run, retries included (default: the operator's)")
    ttl_seconds_after_finished: Annotated[int, Field(ge=0)] | None = None
    suspend: bool = False


# An InferenceService name (a DNS-1035 label: it becomes a Service's name).
DNS_LABEL = r"^[a-z]([-a-z0-9]*[a-z0-9])?$"
# Flags the vLLM ServingRuntime sets itself: given again they would point vLLM elsewhere.
RUNTIME_FLAGS = ("--model", "--port", "--served-model-name")
REGISTRY_URL = r"^https?://[^\s/?#]+(/[^\s?#]*)?$"


class ServeResources(Strict):
    cpu: Quantity = "4"
    memory: Quantity = "16Gi"
    gpus: Annotated[int, Field(ge=0, le=16)] = 1
    gpu_resource: Annotated[str, Field(max_length=253)] = "nvidia.com/gpu"


class Serve(Strict):
    """After success, a KServe InferenceService serving the output with vLLM (the operator makes it)."""

    name: Annotated[str, Field(min_length=1, max_length=63, pattern=DNS_LABEL)] | None = Field(
        None, description="the InferenceService's name (default: from the CompressionJob's name)")
    runtime: Name | None = Field(None, description="a ServingRuntime in the namespace (default: one made from the platform's vLLM template)")
    resources: ServeResources = Field(default_factory=ServeResources)
    args: Annotated[list[Annotated[str, Field(min_length=1, max_length=1024)]], Field(max_length=32)] = Field(
        default_factory=list, description="extra vLLM arguments, e.g. --max-model-len=8192")
    replicas: Annotated[int, Field(ge=1, le=16)] = 1
    deployment_mode: Literal["RawDeployment", "Serverless"] = "RawDeployment"
    service_account_name: Name | None = Field(None, description="the predictor's ServiceAccount (plain KServe: the one holding S3 credentials)")
    delete_with_job: bool = Field(False, description="delete the InferenceService with the CompressionJob (by default it outlives the job)")

    @classmethod
    def rules(cls, data: Mapping[str, Any]) -> list[SpecProblem]:
        args = raw(data, "args")
        return [SpecProblem(f"args.{index}", f"{shown(arg)} is set by the ServingRuntime; remove it")
                for index, arg in enumerate(args if isinstance(args, list) else [])
                if isinstance(arg, str) and arg.split("=", 1)[0] in RUNTIME_FLAGS]


class Register(Strict):
    """After success, the output as a new version in a Model Registry, with its lineage and its figures."""

    registry: Annotated[str, Field(min_length=1, max_length=1024, pattern=REGISTRY_URL)] = Field(
        description="the registry's REST address, e.g. https://my-registry-rest.apps.example.com")
    model_name: Short | None = Field(None, description="the registered model (default: the output's last path segment)")
    version: Short | None = Field(None, description="the new version's name (default: the CompressionJob's name)")
    token_secret: KeyRef | None = Field(None, description="Secret key holding a bearer token for the registry")


class JobSpec(Strict):
    model: ModelSource
    recipe: Recipe
    calibration: Calibration = Field(default_factory=Calibration)
    evaluation: Evaluation = Field(default_factory=Evaluation)
    output: Output
    runtime: Runtime = Field(default_factory=Runtime)
    serve: Serve | None = Field(None, description="serve the output once the job succeeds (the operator; the runner ignores it)")
    # `register` on the wire; the Python name keeps clear of the class method every pydantic model has
    registration: Register | None = Field(None, alias="register",
                                          description="register the output once the job succeeds (the operator; the runner ignores it)")

    @classmethod
    def rules(cls, data: Mapping[str, Any]) -> list[SpecProblem]:
        recipe, calibration = raw(data, "recipe"), raw(data, "calibration") or {}
        if not isinstance(recipe, Mapping) or not isinstance(calibration, Mapping):
            return []
        preset, algorithm = raw(recipe, "preset"), raw(recipe, "algorithm") or "GPTQ"
        if preset not in PRESETS or algorithm not in ALGORITHMS or Recipe.rules(recipe):  # the recipe's own problems say why
            return []
        if preset_needs_data(preset, algorithm) and not given(calibration, "dataset"):
            return [SpecProblem("calibration.dataset",
                                f"{algorithm} with {preset} needs calibration data; give a dataset or {SELF_GENERATED}")]
        return []


@dataclasses.dataclass(frozen=True)
class ConnectionUse:
    """One role's connection Secret (None: not named) and the URIs it serves, by their spec field."""

    role: Role
    secret: str | None
    uris: tuple[tuple[str, str], ...]

    @property
    def needed(self) -> bool:
        """Whether the role reads or writes S3 at all."""
        return any(scheme_of(uri) == "s3" for _, uri in self.uris)


def connection_uses(spec: JobSpec) -> tuple[ConnectionUse, ...]:
    """Each role of ROLES with the spec's connection and URIs for it, in the order of ROLES."""
    ppl = spec.evaluation.perplexity
    data = (("spec.calibration.dataset", spec.calibration.dataset),
            ("spec.evaluation.perplexity.dataset", ppl.dataset if ppl else None))
    return (
        ConnectionUse(ROLE["model"], spec.model.connection, (("spec.model.uri", spec.model.uri),)),
        ConnectionUse(ROLE["data"], spec.calibration.connection, tuple((f, uri) for f, uri in data if uri)),
        ConnectionUse(ROLE["output"], spec.output.connection, (("spec.output.uri", spec.output.uri),)),
    )


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
    # what the operator wrote: a job read back from the cluster (`kubectl get -o yaml`) still runs
    status: dict[str, Any] | None = Field(None, exclude=True)


def parse_job(document: Any) -> CompressionJob:
    """Validate a CompressionJob document; raise InvalidSpec listing every problem found."""
    try:
        return CompressionJob.model_validate(document)
    except ValidationError as err:
        raise InvalidSpec([describe(e) for e in err.errors()]) from None


def describe(error: Any) -> str:
    """One pydantic error as `field.path: what is wrong and how to fix it`, never repeating a secret."""
    message = error["msg"] if error["type"] == RULE_ERROR else _message(error)
    return f"{'.'.join(map(key_shown, error['loc'])) or '(document)'}: {message}"


def _message(error: Any) -> str:
    kind, ctx, value = error["type"], error.get("ctx", {}), error.get("input")
    secret = isinstance(value, str) and secret_like(value)
    if kind == "missing":
        return "required; add it"
    if kind == "extra_forbidden":
        return "unknown field; check its spelling (fields are camelCase)"
    if kind in ("greater_than_equal", "less_than_equal", "greater_than", "less_than"):
        sign = {"greater_than_equal": "≥", "less_than_equal": "≤", "greater_than": ">", "less_than": "<"}[kind]
        bound = next(iter(ctx.values()))
        return f"must be {sign} {bound} (got {shown(value)})"
    if kind in ("enum", "literal_error"):
        return f"must be one of {ctx.get('expected')} (got {shown(value)})"
    if kind == "string_pattern_mismatch":
        hint = _PATTERN_HINTS.get(ctx.get("pattern"), "check its format")
        if secret:
            return f"{HIDDEN} is not valid here; {hint}, and give the name of the Secret that holds a key, never the key itself"
        return f"{shown(value)} is not valid here; {hint}"
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
    DNS_LABEL: "use lower-case letters, digits and '-', starting with a letter",
    REGISTRY_URL: "use the registry's REST address, as in https://host[:port]",
}



# --- the runner's events ---------------------------------------------------------------------------
# The runner writes each event as one JSON line on stdout and the last one to the termination
# message; the operator reads them back with `parse_event`. Readers ignore fields they do not
# know, so an operator keeps reading a newer runner's output (`runtime.image` may differ).


class Wire(BaseModel):
    """camelCase on the wire, like the spec; unknown fields are ignored when read."""

    model_config = ConfigDict(extra="ignore", alias_generator=to_camel, populate_by_name=True)

    def to_json(self) -> str:
        """The event as the runner writes it: camelCase, compact, without fields it has no value for."""
        return self.model_dump_json(by_alias=True, exclude_none=True)


class StageMemory(Wire):
    """One stage's estimated peak resident memory, the whole process's."""

    stage: str
    bytes: int
    skipped: bool | None = None  # the stage will not run: it would not fit (answers)


class MemoryEstimate(Wire):
    """The preflight's estimate of a job's peak resident memory, stage by stage, made before any download."""

    peak_bytes: int
    peak_stage: str
    limit_bytes: int | None = None  # the pod's memory limit (cgroup), --memory-limit, or the machine's memory
    stages: list[StageMemory] = Field(default_factory=list)
    activation_storage: ActivationStorage | None = None  # where compression keeps the calibration activations


class ProgressEvent(Wire):
    """How far a long stage is: layers for compression, bytes for transfers, tokens for self-generated
    data; the first one (stage `preflight`) carries the memory estimate."""

    event: Literal["progress"] = "progress"
    stage: str
    percent: float
    layer: int | None = None
    layers: int | None = None
    bytes: int | None = None
    total_bytes: int | None = None
    tokens: int | None = None
    total_tokens: int | None = None
    tokens_per_second: float | None = None
    eta_seconds: int | None = Field(None, validation_alias=AliasChoices("etaSeconds", "eta_seconds", "eta_s"))  # eta_s: earlier runner images
    resumed_at: int | None = None  # compression: the first layer this run computes, the ones before were kept by an earlier run
    memory: MemoryEstimate | None = None


class StageEvent(Wire):
    """A stage begins; `uri`, `dataset` or `model` say what it works on."""

    event: Literal["stage"] = "stage"
    stage: str
    uri: str | None = None
    dataset: str | None = None
    model: Literal["original", "compressed"] | None = None


class TransferEvent(Wire):
    """What a download moved, and what it could skip or resume from an earlier try."""

    event: Literal["transfer"] = "transfer"
    stage: str
    files: int
    bytes: int
    skipped_files: int
    resumed_bytes: int


class JobRef(Wire):
    name: str
    namespace: str | None = None
    uid: str | None = None


class ModelRef(Wire):
    uri: str
    revision: str | None = None


class OutputRef(Wire):
    uri: str
    files: int | None = None
    uploaded_bytes: int | None = None


class RecipeRef(Wire):
    summary: str
    modifiers: list[str]


class CalibrationRef(Wire):
    dataset: str | None
    samples: int


class Sizes(Wire):
    original_bytes: int
    compressed_bytes: int
    ratio: float


class Gate(Wire):
    max_perplexity_increase: float
    passed: bool


class ServedNll(Wire):
    """vLLM's token NLL of the evaluation text against transformers' on the same tokens (spec.evaluation.servable)."""

    vllm: float
    transformers: float
    relative_difference: float  # (vllm - transformers) / transformers
    bound: float  # SERVED_NLL_BOUND when the runner measured it
    passed: bool


class Metrics(Wire):
    """Quality figures; ones this reader does not know are kept, so status shows a newer runner's too."""

    model_config = ConfigDict(**{**Wire.model_config, "extra": "allow"})
    perplexity_original: float | None = None
    perplexity_compressed: float | None = None
    perplexity_increase_percent: float | None = None
    gate: Gate | None = None
    served_nll: ServedNll | None = None


class Answer(Wire):
    prompt: str
    original: str
    compressed: str


class ServedAnswer(Wire):
    prompt: str
    answer: str


class Served(Wire):
    """What vLLM made of the output before it was published (spec.evaluation.servable); its NLL is in the metrics."""

    served_by: str  # "vllm 0.32.0"; "vllm" alone when it failed before saying its version
    loaded: bool
    reason: str | None = Field(None, description="vLLM's own one-line reason when it could not load or run the output")
    answers: list[ServedAnswer] | None = None
    tokens: int | None = Field(None, description="evaluation tokens vLLM scored, the ones transformers scored")
    quantization: str | None = None  # the quantization method vLLM reports
    kernels: list[str] | None = None  # the linear kernels vLLM chose
    seconds: float | None = None


class RunReport(Wire):
    """What a run made and how good it is: whole in a result, as far as it got in a failure.

    Every field may be missing when read: a termination message that would pass Kubernetes'
    limit keeps only its most useful fields.
    """

    job: JobRef | None = None
    model: ModelRef | None = None
    output: OutputRef | None = None
    recipe: RecipeRef | None = None
    calibration: CalibrationRef | None = None
    sizes: Sizes | None = None
    metrics: Metrics | None = None
    answers: list[Answer] | None = None
    answers_skipped: str | None = Field(None, description="why the prompts were not answered (a model too big for the pod's memory)")
    served: Served | None = None
    resumed_compression: bool | None = None
    versions: dict[str, str] | None = None
    durations_s: dict[str, float] | None = Field(None, description="seconds by stage, and in all as `total`")


class ResultEvent(RunReport):
    """The job succeeded: the model is published at output.uri."""

    event: Literal["result"] = "result"
    status: Literal["Succeeded"] = "Succeeded"


FailureReason = Literal["InvalidSpec", "InvalidInput", "QualityGateFailed", "Error"]
# The reason a permanent exit code stands for, when the runner's own message is lost.
EXIT_REASONS: dict[ExitCode, FailureReason] = {
    ExitCode.INVALID_INPUT: "InvalidInput",
    ExitCode.QUALITY_GATE_FAILED: "QualityGateFailed",
}


class FailureEvent(RunReport):
    """The job failed: why (for tools), the one-line message (for people) and the exit code."""

    event: Literal["failure"] = "failure"
    status: Literal["Failed"] = "Failed"
    # plain str and int when read: an operator keeps reading a newer runner's reasons and codes
    reason: str
    exit_code: int
    message: str
    problems: list[str] | None = Field(None, description="every problem of an invalid spec, each naming its field")


Event = Annotated[ProgressEvent | StageEvent | TransferEvent | ResultEvent | FailureEvent, Field(discriminator="event")]
_EVENT = TypeAdapter(Event)


def parse_event(line: str) -> ProgressEvent | StageEvent | TransferEvent | ResultEvent | FailureEvent | None:
    """One line of the runner's output as its event; None for anything else (logs, broken lines)."""
    line = line.strip()
    if not line.startswith("{"):
        return None
    try:
        return _EVENT.validate_json(line)
    except (ValidationError, ValueError):
        return None
