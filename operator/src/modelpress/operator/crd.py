"""The CompressionJob CRD, generated from the spec model so the two never drift apart.

`make crd` (`python -m modelpress.operator.crd > crds/compressionjob.yaml`) writes the committed file; a test
checks that the file equals `build_crd()`. The OpenAPI schema is derived from pydantic's JSON
schema and made structural (refs inlined, optional fields plain, free-form maps marked to keep
unknown fields); CEL rules restate the model's cross-field checks so the API server rejects a
bad CompressionJob before the operator ever sees it.
"""

import sys
import typing
from typing import Any

import yaml
from pydantic import BaseModel

from modelpress.operator.conditions import UNOBSERVED
from modelpress.operator.status import Status
from modelpress.contract import API_VERSION, KIND, RUNTIME_FLAGS, STATIC_ACTIVATION_PRESETS, JobSpec, Scheme, uri_prefix

GROUP, VERSION = API_VERSION.split("/")
PLURAL = "compressionjobs"
SINGULAR = "compressionjob"

# Keys of pydantic's JSON schema that the Kubernetes structural schema keeps as they are.
_KEPT = ("type", "description", "enum", "format", "minimum", "maximum", "minLength", "maxLength",
         "pattern", "minItems", "maxItems", "maxProperties", "required")

# The model treats these as "only for a preset" once they are set at all, so the API server
# must not fill them in; the runner applies their defaults itself.
NO_SERVER_DEFAULT = {("Recipe", "algorithm"), ("Recipe", "ignore")}

_NEEDS_NO_DATA = " && ".join(f"self.recipe.preset != '{p}'" for p in sorted(STATIC_ACTIVATION_PRESETS))


def _only_for(field: str, scheme: Scheme, what: str) -> dict[str, str]:
    """`field` may be set only when self.uri has `scheme` (the contract's spelling of its prefix)."""
    prefix = uri_prefix(scheme)
    return {"rule": f"!has(self.{field}) || self.uri.startsWith('{prefix}')", "message": f"{field} only applies to {prefix} {what}"}


# CEL rules per model (by class name), restating the model's validators.
RULES: dict[str, list[dict[str, str]]] = {
    "Recipe": [
        {"rule": "[has(self.preset), has(self.modifiers), has(self.configMap)].filter(x, x).size() == 1",
         "message": "give exactly one of preset, modifiers or configMap"},
        {"rule": "has(self.preset) || !(has(self.algorithm) || has(self.groupSize) || has(self.ignore))",
         "message": "algorithm, groupSize and ignore only apply to a preset; set them inside the recipe instead"},
    ],
    "ModelSource": [_only_for("revision", "hf", "models"), _only_for("tokenSecret", "hf", "models"),
                    _only_for("connection", "s3", "models")],
    "Output": [_only_for("connection", "s3", "outputs"), _only_for("publishConnection", "s3", "outputs")],
    "Serve": [
        {"rule": "self.args.all(a, !a.matches('^(" + "|".join(RUNTIME_FLAGS) + ")(=|$)'))",
         "message": f"the ServingRuntime sets {', '.join(RUNTIME_FLAGS)} itself; remove them from args"},
    ],
    "Evaluation": [
        {"rule": "!has(self.maxPerplexityIncrease) || has(self.perplexity)",
         "message": "maxPerplexityIncrease needs evaluation.perplexity to measure"},
        {"rule": "!has(self.servable) || !self.servable || has(self.perplexity)",
         "message": "servable needs evaluation.perplexity, the text vLLM and transformers both score"},
    ],
    "JobSpec": [
        {"rule": "!has(self.recipe.preset) || has(self.calibration.dataset) || "
                 f"(has(self.recipe.algorithm) && self.recipe.algorithm == 'RTN' && {_NEEDS_NO_DATA})",
         "message": "this recipe needs calibration data; give calibration.dataset (or self-generated)"},
    ],
}


def _models(model: type[BaseModel], found: dict[str, type[BaseModel]] | None = None) -> dict[str, type[BaseModel]]:
    """Every pydantic model reachable from `model`'s fields, by class name (pydantic's $defs keys)."""
    found = {} if found is None else found
    found[model.__name__] = model

    def visit(annotation: Any) -> None:
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            if annotation.__name__ not in found:
                _models(annotation, found)
        for arg in typing.get_args(annotation):
            visit(arg)

    for field in model.model_fields.values():
        visit(field.annotation)
    return found


def _server_default(model: type[BaseModel], name: str) -> Any:
    """The default the API server should fill in for a field, or None for none."""
    field = model.model_fields[name]
    if (model.__name__, name) in NO_SERVER_DEFAULT:
        return None
    if field.default_factory is not None:
        value = field.default_factory()
        return {} if isinstance(value, BaseModel) else value
    return None


def _structural(node: dict[str, Any], defs: dict[str, Any], models: dict[str, type[BaseModel]]) -> dict[str, Any]:
    if "$ref" in node:
        name = node["$ref"].rsplit("/", 1)[-1]
        merged = {**defs[name], **{k: v for k, v in node.items() if k != "$ref"}}
        return _structural_model(merged, name, defs, models)
    if "anyOf" in node:
        options = [option for option in node["anyOf"] if option != {"type": "null"}]
        if len(options) != 1:
            raise ValueError(f"cannot express a union of {options} in a structural schema")
        rest = {k: v for k, v in node.items() if k != "anyOf"}
        return _structural({**options[0], **rest}, defs, models)
    out = {key: node[key] for key in _KEPT if key in node}
    if node.get("default") is not None:
        out["default"] = node["default"]
    if "items" in node:
        out["items"] = _structural(node["items"], defs, models)
    if "properties" in node:
        out["properties"] = {key: _structural(value, defs, models) for key, value in node["properties"].items()}
    extra = node.get("additionalProperties")
    if extra is True or (node.get("type") == "object" and "properties" not in node and extra is None):
        out["x-kubernetes-preserve-unknown-fields"] = True
    elif isinstance(extra, dict):
        out["additionalProperties"] = _structural(extra, defs, models)
    return out


def _structural_model(node: dict[str, Any], name: str, defs: dict[str, Any], models: dict[str, type[BaseModel]]) -> dict[str, Any]:
    out = _structural(node, defs, models)
    model = models[name]
    for field_name, field in model.model_fields.items():
        key = field.alias or field_name
        prop = out["properties"][key]
        if (name, field_name) in NO_SERVER_DEFAULT:
            prop.pop("default", None)
        elif (default := _server_default(model, field_name)) is not None:
            prop["default"] = default
    if name in RULES:
        out["x-kubernetes-validations"] = RULES[name]
    return out


def openapi_schema(model: type[BaseModel]) -> dict[str, Any]:
    """A Kubernetes structural OpenAPI v3 schema for a pydantic model (camelCase field names)."""
    schema = model.model_json_schema(by_alias=True, mode="validation")
    defs = schema.pop("$defs", {})
    return _structural_model(schema, model.__name__, defs, _models(model))


def _immutability_rules(spec: dict[str, Any]) -> list[dict[str, str]]:
    """Spec is fixed after creation (a change means a new job), except runtime.suspend."""
    sections = [key for key in spec["properties"] if key != "runtime"]
    rules = [{"rule": f"self.{key} == oldSelf.{key}" if key in spec.get("required", []) or "default" in spec["properties"][key]
              else f"has(self.{key}) == has(oldSelf.{key}) && (!has(self.{key}) || self.{key} == oldSelf.{key})",
              "message": f"spec.{key} is immutable; create a new CompressionJob instead"} for key in sections]
    runtime = [key for key in spec["properties"]["runtime"]["properties"] if key != "suspend"]
    checks = " && ".join(
        f"has(self.runtime.{key}) == has(oldSelf.runtime.{key}) && "
        f"(!has(self.runtime.{key}) || self.runtime.{key} == oldSelf.runtime.{key})" for key in runtime)
    rules.append({"rule": checks, "message": "spec.runtime is immutable except suspend; create a new CompressionJob instead"})
    return rules


def build_crd() -> dict[str, Any]:
    """The whole CustomResourceDefinition object."""
    spec = openapi_schema(JobSpec)
    spec["x-kubernetes-validations"] = spec.get("x-kubernetes-validations", []) + _immutability_rules(spec)
    status = openapi_schema(Status)
    status["default"] = dict(UNOBSERVED)
    status["properties"]["conditions"]["x-kubernetes-list-type"] = "map"
    status["properties"]["conditions"]["x-kubernetes-list-map-keys"] = ["type"]
    columns = [
        ("Model", "string", ".spec.model.uri", 0),
        ("Recipe", "string", ".status.recipe", 0),
        ("Phase", "string", ".status.phase", 0),
        ("Progress", "integer", ".status.progress.percent", 0),
        ("Ratio", "number", ".status.result.ratio", 0),
        ("Output", "string", ".spec.output.uri", 1),
        ("Reason", "string", ".status.failure.reason", 1),
        ("Endpoint", "string", ".status.serving.url", 1),
        ("Age", "date", ".metadata.creationTimestamp", 0),
    ]
    return {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {"name": f"{PLURAL}.{GROUP}"},
        "spec": {
            "group": GROUP,
            "names": {"kind": KIND, "listKind": f"{KIND}List", "plural": PLURAL, "singular": SINGULAR,
                      "shortNames": ["cjob"], "categories": ["modelpress"]},
            "scope": "Namespaced",
            "versions": [{
                "name": VERSION,
                "served": True,
                "storage": True,
                "subresources": {"status": {}},
                "additionalPrinterColumns": [
                    {"name": name, "type": kind, "jsonPath": path, **({"priority": priority} if priority else {})}
                    for name, kind, path, priority in columns
                ],
                "schema": {"openAPIV3Schema": {
                    "type": "object",
                    "description": "Compress a Hugging Face LLM into a compressed-tensors checkpoint that vLLM serves.",
                    "required": ["spec"],
                    "properties": {
                        "apiVersion": {"type": "string"},
                        "kind": {"type": "string"},
                        "metadata": {"type": "object"},
                        "spec": spec,
                        "status": status,
                    },
                }},
            }],
        },
    }


class _PlainDumper(yaml.SafeDumper):
    """Writes repeated values in full: anchors and aliases confuse readers of a CRD."""

    def ignore_aliases(self, data: Any) -> bool:
        return True


def render() -> str:
    """The CRD as the YAML committed under crds/."""
    header = "# Generated by `python -m modelpress.operator.crd` from the spec model; do not edit by hand.\n"
    return header + yaml.dump(build_crd(), Dumper=_PlainDumper, sort_keys=False, width=120)


if __name__ == "__main__":
    sys.stdout.write(render())
