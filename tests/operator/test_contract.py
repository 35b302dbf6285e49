"""The CompressionJob spec: defaults, camelCase, and every problem reported with its field path."""

import copy
import json
import subprocess
import sys
from typing import Any

import pytest

from modelpress.contract import CompressionJob, InvalidSpec, parse_job

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
        ({"model": {"uri": "s3://b/m", "tokenSecret": {"name": "hf", "key": "HF_TOKEN"}}}, "spec.model.tokenSecret"),
        ({"output": {"uri": "/tmp/out", "connection": "models-s3"}}, "spec.output.connection: only applies to s3://"),
        ({"evaluation": {"maxPerplexityIncrease": 5}}, "spec.evaluation.maxPerplexityIncrease: needs evaluation.perplexity"),
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
