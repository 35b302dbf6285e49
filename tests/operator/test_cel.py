"""The CRD's CEL rules, run with cel-python: they refuse what the spec model refuses, let through what
it accepts, and keep the spec fixed after creation except runtime.suspend."""

import copy
import re
from pathlib import Path
from typing import Any

import pytest
import yaml

from support.cel import violations
from support.crd_schema import with_defaults
from modelpress.contract import REMOTE_SCHEMES, InvalidSpec, parse_job, uri_prefix
from modelpress.operator.crd import build_crd

SCHEMA = build_crd()["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
EXAMPLES = sorted((Path(__file__).resolve().parents[2] / "deploy" / "examples").glob("*.yaml"))
BASE: dict[str, Any] = {
    "model": {"uri": "hf://acme/tiny", "revision": "main", "tokenSecret": {"name": "hf", "key": "HF_TOKEN"}},
    "recipe": {"preset": "W4A16", "algorithm": "GPTQ", "groupSize": 64},
    "calibration": {"dataset": "self-generated"},
    "evaluation": {"perplexity": {"dataset": "hf://wikitext"}, "maxPerplexityIncrease": 5},
    "output": {"uri": "s3://models/tiny", "connection": "models-s3"},
}


def document(spec: dict[str, Any]) -> dict[str, Any]:
    return with_defaults({"apiVersion": "modelpress.dev/v1alpha1", "kind": "CompressionJob",
                          "metadata": {"name": "j", "namespace": "ml"}, "spec": spec})


def changed(path: str, value: Any) -> dict[str, Any]:
    """BASE with the field at `path` (dots) set to `value`, or removed when `value` is None."""
    spec = copy.deepcopy(BASE)
    *parents, last = path.split(".")
    node = spec
    for key in parents:
        node = node.setdefault(key, {})
    if value is None:
        node.pop(last, None)
    else:
        node[last] = value
    return spec


def model_refuses(spec: dict[str, Any]) -> bool:
    try:
        parse_job(document(spec))
    except InvalidSpec:
        return True
    return False


@pytest.mark.parametrize("path, value, message", [
    ("recipe.modifiers", {"stage": {}}, "give exactly one of preset, modifiers or configMap"),
    ("recipe.preset", None, "give exactly one of preset, modifiers or configMap"),
    ("model.uri", "s3://base/tiny", "revision only applies to hf:// models"),
    ("model.connection", "base-s3", "connection only applies to s3:// models"),
    ("output.uri", "pvc://out/tiny", "connection only applies to s3:// outputs"),
    ("evaluation.perplexity", None, "maxPerplexityIncrease needs evaluation.perplexity to measure"),
    ("evaluation", {"servable": True}, "servable needs evaluation.perplexity"),
    ("calibration.dataset", None, "this recipe needs calibration data"),
    ("output", {"uri": "pvc://out/tiny", "publishConnection": {}}, "publishConnection only applies to s3:// outputs"),
    ("serve", {"args": ["--max-model-len=4096", "--port=9000"]}, "remove them from args"),
    ("serve", {"args": ["--served-model-name"]}, "remove them from args"),
])
def test_a_rule_refuses_what_the_model_refuses(path: str, value: Any, message: str) -> None:
    spec = changed(path, value)
    found = violations(SCHEMA, document(spec))
    assert model_refuses(spec)
    assert any(message in problem for problem in found), found


@pytest.mark.parametrize("spec", [
    BASE,
    changed("recipe.algorithm", "RTN") | {"calibration": {}},  # RTN on a weight-only preset reads no data
    {**changed("model.uri", "s3://base/tiny"), "model": {"uri": "s3://base/tiny", "connection": "base-s3"}},
    {**BASE, "recipe": {"modifiers": {"quant_stage": {"quant_modifiers": {"QuantizationModifier": {"scheme": "W8A16"}}}}}},
    {**BASE, "recipe": {"configMap": {"name": "recipes", "key": "gptq.yaml"}}},
    {**BASE, "output": {"uri": "pvc://out/tiny"}},
    {**BASE, "serve": {"args": ["--max-model-len=4096", "--portable"]}},
], ids=["hub-to-s3", "rtn-without-data", "s3-source", "modifiers", "configmap", "pvc-output", "serve-args"])
def test_what_the_model_accepts_passes_every_rule(spec: dict[str, Any]) -> None:
    assert not model_refuses(spec)
    assert violations(SCHEMA, document(spec)) == []


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_the_examples_pass_every_rule(path: Path) -> None:
    for doc in yaml.safe_load_all(path.read_text()):
        if doc and doc["kind"] == "CompressionJob":
            assert violations(SCHEMA, with_defaults(doc)) == []


@pytest.mark.parametrize("path, value", [
    ("model.uri", "hf://acme/other"),
    ("recipe.groupSize", 128),
    ("output.overwrite", True),
    ("runtime.image", "quay.io/me/runner:2"),
    ("runtime.activeDeadlineSeconds", 3600),
    ("runtime.scratchVolume", {"deleteOnSuccess": True}),
    ("runtime.resources", {"gpus": 2}),
])
def test_the_spec_cannot_change_after_creation(path: str, value: Any) -> None:
    old = document(BASE)
    new = document(changed(path, value))
    assert violations(SCHEMA, new) == []  # valid as a new CompressionJob
    found = violations(SCHEMA, new, old)
    assert any("immutable" in problem and "create a new CompressionJob instead" in problem for problem in found), found


def test_suspend_is_the_one_field_that_may_change() -> None:
    old = document(BASE)
    new = copy.deepcopy(old)
    new["spec"]["runtime"]["suspend"] = True
    assert violations(SCHEMA, new, old) == []


def test_scheme_rules_spell_the_contracts_prefixes() -> None:
    rules = [rule["rule"] for _, node in _nodes(SCHEMA) for rule in node.get("x-kubernetes-validations") or []]
    spelled = {match for rule in rules for match in re.findall(r"startsWith\('([^']*)'\)", rule)}
    assert spelled and spelled <= {uri_prefix(scheme) for scheme in REMOTE_SCHEMES}


def _nodes(node: dict[str, Any], path: str = "") -> list[tuple[str, dict[str, Any]]]:
    found = [(path, node)]
    for key, sub in (node.get("properties") or {}).items():
        found += _nodes(sub, f"{path}.{key}")
    return found
