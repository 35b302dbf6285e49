"""The CRD: generated from the spec model, committed as generated, structural, bounded, and complete."""

import typing
from pathlib import Path
from typing import Any

import pytest
import yaml
from pydantic import BaseModel

from modelpress.operator.crd import build_crd, render
from modelpress.operator.status import Status
from modelpress.contract import JobSpec

REPO = Path(__file__).resolve().parents[2]
SCHEMA = build_crd()["spec"]["versions"][0]["schema"]["openAPIV3Schema"]


def walk(node: dict[str, Any], path: str = "") -> list[tuple[str, dict[str, Any]]]:
    found = [(path, node)]
    for key, sub in (node.get("properties") or {}).items():
        found += walk(sub, f"{path}.{key}")
    if "items" in node:
        found += walk(node["items"], f"{path}[]")
    if isinstance(node.get("additionalProperties"), dict):
        found += walk(node["additionalProperties"], f"{path}{{}}")
    return found


def test_committed_crd_is_the_generated_one() -> None:
    committed = (REPO / "crds" / "compressionjob.yaml").read_text()
    assert committed == render(), "crds/compressionjob.yaml is stale: run `make crd`"


def model_paths(model: type, prefix: str) -> set[str]:
    """Every field path of a pydantic model, by wire name, descending into nested models."""
    paths = set()
    for name, field in model.model_fields.items():
        path = f"{prefix}.{field.alias or name}"
        paths.add(path)
        stack = [field.annotation]
        while stack:
            annotation = stack.pop()
            if isinstance(annotation, type) and issubclass(annotation, BaseModel):
                paths |= model_paths(annotation, path + ("[]" if typing.get_origin(field.annotation) is list else ""))
            else:
                stack += [a for a in typing.get_args(annotation) if a is not type(None)]
    return paths


@pytest.mark.parametrize("section, model", [("spec", JobSpec), ("status", Status)])
def test_schema_matches_the_model_field_for_field(section: str, model: type) -> None:
    schema_paths = {path for path, _ in walk(SCHEMA["properties"][section], f".{section}") if not path.endswith(("{}", "[]"))}
    schema_paths.discard(f".{section}")
    assert schema_paths == model_paths(model, f".{section}")


def test_every_string_list_and_map_is_bounded() -> None:
    unbounded = []
    for path, node in walk(SCHEMA):
        if path in ("", ".metadata", ".apiVersion", ".kind"):
            continue
        if node.get("type") == "string" and "maxLength" not in node and "enum" not in node:
            unbounded.append(path)
        if node.get("type") == "array" and "maxItems" not in node:
            unbounded.append(path)
        if node.get("type") == "object" and "properties" not in node and "maxProperties" not in node:
            unbounded.append(path)
    assert unbounded == []


def test_schema_is_structural() -> None:
    for path, node in walk(SCHEMA):
        assert "type" in node, f"{path}: every node needs a type"
        assert not {"$ref", "anyOf", "oneOf", "allOf", "propertyNames", "title"} & set(node), path
        assert not ("properties" in node and "additionalProperties" in node), path


def test_names_columns_subresource_and_rules() -> None:
    crd = yaml.safe_load((REPO / "crds" / "compressionjob.yaml").read_text())
    names = crd["spec"]["names"]
    assert crd["metadata"]["name"] == "compressionjobs.modelpress.dev" and crd["spec"]["scope"] == "Namespaced"
    assert names["shortNames"] == ["cjob"] and names["categories"] == ["modelpress"]
    version = crd["spec"]["versions"][0]
    assert version["name"] == "v1alpha1" and version["subresources"] == {"status": {}}
    columns = {c["name"]: c["jsonPath"] for c in version["additionalPrinterColumns"]}
    assert {"Model", "Recipe", "Phase", "Progress", "Ratio", "Age"} <= set(columns)
    known = {path for path, _ in walk(SCHEMA)}
    for name, path in columns.items():
        assert path in known or path == ".metadata.creationTimestamp", f"column {name}: {path} is not in the schema"
    spec_rules = [r["rule"] for r in SCHEMA["properties"]["spec"]["x-kubernetes-validations"]]
    assert "self.model == oldSelf.model" in spec_rules and any("suspend" not in r and "runtime.image" in r for r in spec_rules)
    assert all("runtime.suspend" not in r for r in spec_rules)
    recipe_rules = SCHEMA["properties"]["spec"]["properties"]["recipe"]["x-kubernetes-validations"]
    assert "exactly one" in recipe_rules[0]["message"]
    conditions = SCHEMA["properties"]["status"]["properties"]["conditions"]
    assert conditions["x-kubernetes-list-type"] == "map" and conditions["x-kubernetes-list-map-keys"] == ["type"]


def test_defaults_are_the_models_except_those_only_for_presets() -> None:
    spec = SCHEMA["properties"]["spec"]["properties"]
    assert spec["calibration"]["default"] == {} and spec["calibration"]["properties"]["numSamples"]["default"] == 512
    assert spec["runtime"]["properties"]["resources"]["properties"]["memory"]["default"] == "16Gi"
    # Set by the server, these would make a modifiers recipe fail the model's "only for a preset" rule.
    assert "default" not in spec["recipe"]["properties"]["algorithm"]
    assert "default" not in spec["recipe"]["properties"]["ignore"]
