"""The contract: the CompressionJob spec (defaults, camelCase, every problem with its field path), events, URIs, roles."""

import copy
import json
import subprocess
import sys
from typing import Any

import pytest

from modelpress.contract import (EXIT_REASONS, PERMANENT_EXIT_CODES, PRESETS, ROLES, S3_IDENTITY_KEYS, S3_KEYS, S3_REQUIRED_KEYS,
                                 S3_TRANSPORT_KEYS, CompressionJob, ExitCode, FailureEvent, InvalidSpec, ProgressEvent,
                                 ResultEvent, StageEvent, TransferEvent, UnsupportedScheme, connection_uses, parse_event,
                                 parse_job, parse_uri, pvc_mount)

MINIMAL: dict[str, Any] = {
    "apiVersion": "modelpress.dev/v1alpha1",
    "kind": "CompressionJob",
    "metadata": {"name": "tiny-w4a16"},
    "spec": {
        "model": {"uri": "hf://acme/tiny", "revision": "main"},
        "recipe": {"preset": "W4A16", "algorithm": "RTN"},
        "output": {"uri": "s3://models/tiny-w4a16", "connection": "models-s3"},
    },
}


def job(**spec_changes: Any) -> dict[str, Any]:
    """MINIMAL with spec sections replaced (None deletes one)."""
    doc = copy.deepcopy(MINIMAL)
    for key, value in spec_changes.items():
        if value is None:
            del doc["spec"][key]
        else:
            doc["spec"][key] = value
    return doc


def problems(doc: Any) -> list[str]:
    with pytest.raises(InvalidSpec) as err:
        parse_job(doc)
    return err.value.problems


def test_defaults_and_camel_case_round_trip() -> None:
    parsed = parse_job({**MINIMAL, "metadata": {"name": "tiny-w4a16", "uid": "u1", "resourceVersion": "7"}})
    spec = parsed.spec
    assert spec.calibration.num_samples == 512 and spec.calibration.max_sequence_length == 2048
    assert spec.recipe.ignore == ["lm_head"] and spec.output.overwrite is False
    assert spec.model.trust_remote_code is False and spec.runtime.backoff_limit == 0
    wire = parsed.model_dump(by_alias=True, exclude_none=True)
    assert wire["spec"]["calibration"]["numSamples"] == 512 and "maxSequenceLength" in wire["spec"]["calibration"]
    assert parse_job(json.loads(json.dumps(wire))) == parsed


def test_every_problem_is_listed_with_its_field_path() -> None:
    doc = job(
        model={"uri": "ftp://host/model"},
        recipe={"preset": "W5A16"},
        calibration={"numSamples": 0, "maxSequenceLenght": 128},
        output={"uri": "hf://acme/out"},
        runtime={"resources": {"memory": "lots"}, "tolerations": [{"operator": "Maybe"}]},
    )
    doc["apiVersion"] = "modelpress.dev/v1"
    found = problems(doc)
    expected = [
        "apiVersion: must be one of 'modelpress.dev/v1alpha1'",
        "spec.model.uri: unsupported scheme",
        "spec.recipe.preset: must be one of 'W4A16'",
        "spec.calibration.numSamples: must be ≥ 1 (got 0)",
        "spec.calibration.maxSequenceLenght: unknown field",
        "spec.output.uri: unsupported scheme; use s3://…, pvc://… or a path",
        "spec.runtime.resources.memory: 'lots' is not valid here; use a Kubernetes quantity",
        "spec.runtime.tolerations.0.operator: must be one of 'Exists' or 'Equal'",
    ]
    for line in expected:
        assert any(p.startswith(line) for p in found), (line, found)
    assert len(found) == len(expected)


@pytest.mark.parametrize(
    ("changes", "field"),
    [
        ({"recipe": {"preset": "W4A16", "modifiers": {"quant_stage": {}}}}, "spec.recipe: give exactly one of"),
        ({"recipe": {"algorithm": "RTN"}}, "spec.recipe: give exactly one of"),
        ({"recipe": {"modifiers": {"quant_stage": {}}, "groupSize": 64}}, "spec.recipe.groupSize: only applies to a preset"),
        ({"recipe": {"preset": "W4A16", "algorithm": "GPTQ"}}, "spec.calibration.dataset: GPTQ with W4A16 needs"),
        ({"recipe": {"preset": "FP8", "algorithm": "RTN"}}, "spec.calibration.dataset: RTN with FP8 needs"),
        ({"model": {"uri": "/models/tiny", "revision": "main"}}, "spec.model.revision: only applies to hf://"),
        ({"model": {"uri": "s3://bkt/m", "tokenSecret": {"name": "hf", "key": "HF_TOKEN"}}}, "spec.model.tokenSecret"),
        ({"output": {"uri": "/tmp/out", "connection": "models-s3"}}, "spec.output.connection: only applies to s3://"),
        ({"evaluation": {"maxPerplexityIncrease": 5}}, "spec.evaluation.maxPerplexityIncrease: needs evaluation.perplexity"),
        ({"evaluation": {"servable": True}}, "spec.evaluation.servable: needs evaluation.perplexity, the text vLLM and"),
        ({"model": None}, "spec.model: required"),
        ({"model": {"uri": "s3:///no-bucket"}}, "spec.model.uri: s3:// needs a name"),
        ({"calibration": {"dataset": "gs://bucket/x.jsonl"}}, "spec.calibration.dataset: unsupported scheme"),
        ({"evaluation": {"prompts": ["hi"] * 33}}, "spec.evaluation.prompts: too long; at most 32 entries"),
        ({"runtime": {"resources": {"gpus": -1}}}, "spec.runtime.resources.gpus: must be ≥ 0"),
    ],
)
def test_cross_field_rules_name_the_field(changes: dict[str, Any], field: str) -> None:
    found = problems(job(**changes))
    assert len(found) == 1 and found[0].startswith(field), found


def test_not_a_mapping() -> None:
    assert problems(["not", "a", "job"]) == ["(document): input should be a valid dictionary or instance of CompressionJob"]


def test_json_schema_is_plain_and_bounded() -> None:
    schema = CompressionJob.model_json_schema(by_alias=True)
    recipe = schema["$defs"]["Recipe"]["properties"]
    assert recipe["algorithm"]["enum"] == ["RTN", "GPTQ", "AWQ", "SmoothQuant+GPTQ", "SparseGPT+GPTQ"]
    assert schema["$defs"]["Calibration"]["additionalProperties"] is False

    def unbounded(node: Any, path: str) -> list[str]:
        if isinstance(node, dict):
            out = []
            if node.get("type") == "string" and "maxLength" not in node and "enum" not in node and "const" not in node:
                out.append(path)
            if node.get("type") == "array" and "maxItems" not in node:
                out.append(path)
            for key, child in node.items():
                out += unbounded(child, f"{path}.{key}")
            return out
        if isinstance(node, list):
            return [p for i, child in enumerate(node) for p in unbounded(child, f"{path}[{i}]")]
        return []

    assert unbounded(schema, "") == []


def test_spec_module_does_not_import_torch() -> None:
    code = "import sys, modelpress.contract\nassert 'torch' not in sys.modules, sorted(sys.modules)\n"
    subprocess.run([sys.executable, "-c", code], check=True)


EVENTS = [
    ProgressEvent(stage="compress", percent=50.0, layer=15, layers=30, eta_seconds=95),
    ProgressEvent(stage="publish", percent=12.5, bytes=1 << 20, total_bytes=8 << 20),
    StageEvent(stage="evaluate", model="original"),
    StageEvent(stage="fetch", uri="s3://models/base"),
    TransferEvent(stage="fetch", files=7, bytes=1000, skipped_files=2, resumed_bytes=64),
    ResultEvent.model_validate({
        "job": {"name": "tiny", "namespace": "ml", "uid": "u-1"}, "model": {"uri": "hf://acme/tiny", "revision": "v1"},
        "output": {"uri": "s3://models/tiny", "files": 7, "uploadedBytes": 250},
        "recipe": {"summary": "RTN W4A16", "modifiers": ["QuantizationModifier"]},
        "calibration": {"dataset": "self-generated", "samples": 8},
        "sizes": {"originalBytes": 1000, "compressedBytes": 250, "ratio": 4.0},
        "metrics": {"perplexityOriginal": 18.0, "perplexityCompressed": 18.9, "perplexityIncreasePercent": 5.0,
                    "gate": {"maxPerplexityIncrease": 10.0, "passed": True}},
        "answers": [{"prompt": "Paris is", "original": "the capital", "compressed": "the capital"}],
        "resumedCompression": False, "versions": {"torch": "2.13.0"}, "durationsS": {"compress": 10.0, "total": 12.5}}),
    FailureEvent(reason="InvalidSpec", exit_code=ExitCode.INVALID_INPUT, message="invalid CompressionJob: kind: ...",
                 problems=["kind: must be one of 'CompressionJob'"]),
    FailureEvent(reason="QualityGateFailed", exit_code=ExitCode.QUALITY_GATE_FAILED, message="perplexity rose",
                 metrics={"perplexityIncreasePercent": 14.0, "gate": {"maxPerplexityIncrease": 5.0, "passed": False}}),
]


@pytest.mark.parametrize("event", EVENTS, ids=lambda e: f"{e.event}")
def test_every_event_round_trips_the_wire(event: Any) -> None:
    line = event.to_json()
    assert "\n" not in line and "_" not in "".join(_keys(json.loads(line)))  # camelCase, one line
    assert parse_event(line) == event
    assert parse_event(json.dumps({**json.loads(line), "addedLater": 1})) == event  # a newer runner's extra field


def _keys(value: Any) -> list[str]:
    """Every key of a JSON value, at any depth."""
    if isinstance(value, dict):
        return [*value, *(key for item in value.values() for key in _keys(item))]
    if isinstance(value, list):
        return [key for item in value for key in _keys(item)]
    return []


def test_lines_that_are_not_events_are_skipped() -> None:
    for line in ("loading weights", "{broken", '{"event": "progress"}', '{"event": "unknown"}', "[1, 2]", ""):
        assert parse_event(line) is None


def test_exit_codes_and_reasons() -> None:
    assert [int(c) for c in ExitCode] == [0, 1, 2, 3]
    assert set(PERMANENT_EXIT_CODES) == set(EXIT_REASONS) == {ExitCode.INVALID_INPUT, ExitCode.QUALITY_GATE_FAILED}


@pytest.mark.parametrize(("text", "parsed"), [
    ("hf://acme/tiny", ("hf", "acme/tiny", "")),
    ("hf://acme/tiny/", ("hf", "acme/tiny", "")),
    ("s3://bucket/a/b/", ("s3", "bucket", "a/b")),
    ("s3://bucket", ("s3", "bucket", "")),
    ("pvc://claim/models/x", ("pvc", "claim", "models/x")),
    ("/models/tiny", ("local", "", "/models/tiny")),
    ("self-generated", ("local", "", "self-generated")),
])
def test_one_uri_parser(text: str, parsed: tuple[str, str, str]) -> None:
    uri = parse_uri(text)
    assert (uri.scheme, uri.root, uri.path) == parsed and str(uri) == text


@pytest.mark.parametrize("text", ["pvc://claim/../other", "pvc://claim/a/../../x", "s3://bucket/a/./b", "s3://bucket/../b",
                                  "hf://acme/../tiny", "hf://acme/tiny/extra", "hf://acme--x/tiny"])
def test_uris_that_climb_are_refused(text: str) -> None:
    with pytest.raises(ValueError, match="may not hold|not a hub repository id"):
        parse_uri(text)
    with pytest.raises(InvalidSpec, match="spec.output.uri|spec.model.uri"):
        parse_job({"apiVersion": "modelpress.dev/v1alpha1", "kind": "CompressionJob", "metadata": {"name": "j"},
                   "spec": {"model": {"uri": text}, "recipe": {"preset": "W8A8", "algorithm": "RTN"},
                            "output": {"uri": text.replace("hf://", "s3://")}}})


def test_uri_parser_errors_name_the_fix() -> None:
    with pytest.raises(UnsupportedScheme):
        parse_uri("gs://bucket/x")
    with pytest.raises(ValueError, match=r"^s3:// needs a name after it, as in s3://name/path$"):
        parse_uri("s3:///x")
    assert pvc_mount("models") == "/mnt/pvc/models" and pvc_mount("models", "/tmp/pvc/") == "/tmp/pvc/models"


def test_connection_uses_tie_each_role_to_its_field() -> None:
    spec = parse_job(job(model={"uri": "s3://base/m", "connection": "src"},
                         calibration={"dataset": "s3://data/c.jsonl", "connection": "data"},
                         evaluation={"perplexity": {"dataset": "hf://wikitext"}})).spec
    uses = {use.role.prefix: use for use in connection_uses(spec)}
    assert [r.prefix for r in ROLES] == list(uses) == ["MODEL_", "DATA_", "OUTPUT_"]
    assert uses["DATA_"].uris == (("spec.calibration.dataset", "s3://data/c.jsonl"),
                                  ("spec.evaluation.perplexity.dataset", "hf://wikitext"))
    assert (uses["MODEL_"].secret, uses["MODEL_"].needed, uses["OUTPUT_"].secret) == ("src", True, "models-s3")
    assert set(S3_KEYS) == {*S3_IDENTITY_KEYS, *S3_TRANSPORT_KEYS} and set(S3_REQUIRED_KEYS) < set(S3_IDENTITY_KEYS)


def test_int8_is_a_preset() -> None:
    assert "INT8" in PRESETS and parse_job(job(recipe={"preset": "INT8", "algorithm": "RTN"})).spec.recipe.preset == "INT8"


def test_readers_keep_what_a_newer_or_older_runner_writes() -> None:
    older = parse_event('{"event":"progress","stage":"compress","percent":50,"layer":1,"layers":2,"eta_s":7}')
    assert isinstance(older, ProgressEvent) and older.eta_seconds == 7
    assert '"etaSeconds":7' in older.to_json()
    newer = parse_event('{"event":"failure","status":"Failed","reason":"DiskFull","exitCode":4,"message":"m","extra":1}')
    assert isinstance(newer, FailureEvent) and (newer.reason, newer.exit_code, newer.message) == ("DiskFull", 4, "m")
    result = parse_event('{"event":"result","status":"Succeeded","metrics":{"perplexityOriginal":2,"bleu":0.5}}')
    assert result.metrics.model_dump(by_alias=True, exclude_none=True) == {"perplexityOriginal": 2.0, "bleu": 0.5}
