"""The CRD's OpenAPI schema as a jsonschema validator that also emulates the API server's pruning."""

import copy
from typing import Any

import jsonschema

from modelpress.operator.crd import build_crd


def to_jsonschema(node: Any) -> Any:
    """Kubernetes OpenAPI -> Draft 4: nullable, int-or-string, and unknown fields rejected where pruned."""
    if isinstance(node, list):
        return [to_jsonschema(item) for item in node]
    if not isinstance(node, dict):
        return node
    out = {key: to_jsonschema(value) for key, value in node.items()
           if not key.startswith("x-kubernetes-") and key not in ("nullable", "properties", "additionalProperties", "items")}
    if "properties" in node:
        out["properties"] = {key: to_jsonschema(value) for key, value in node["properties"].items()}
    if "items" in node:
        out["items"] = to_jsonschema(node["items"])
    if isinstance(node.get("additionalProperties"), dict):
        out["additionalProperties"] = to_jsonschema(node["additionalProperties"])
    if node.get("x-kubernetes-int-or-string"):
        out = {"anyOf": [{"type": "integer"}, {"type": "string"}]}
    if "properties" in node and "additionalProperties" not in node and not node.get("x-kubernetes-preserve-unknown-fields"):
        out["additionalProperties"] = False
    if node.get("nullable"):
        out = {"anyOf": [out, {"type": "null"}]}
    return out


def crd_validator() -> jsonschema.Draft4Validator:
    schema = to_jsonschema(build_crd()["spec"]["versions"][0]["schema"]["openAPIV3Schema"])
    return jsonschema.Draft4Validator(schema, format_checker=jsonschema.Draft4Validator.FORMAT_CHECKER)


def problems(validator: jsonschema.Draft4Validator, obj: Any) -> list[str]:
    return [f"{'.'.join(map(str, e.absolute_path)) or '(root)'}: {e.message}" for e in validator.iter_errors(obj)]


def with_defaults(obj: Any, schema: dict[str, Any] | None = None) -> Any:
    """Fill in schema defaults the way the API server does before it stores an object."""
    if schema is None:
        schema = build_crd()["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    if not isinstance(obj, dict) or "properties" not in schema:
        if isinstance(obj, list) and "items" in schema:
            return [with_defaults(item, schema["items"]) for item in obj]
        return obj
    out = dict(obj)
    for key, sub in schema["properties"].items():
        if key not in out and "default" in sub:
            out[key] = copy.deepcopy(sub["default"])
        if key in out:
            out[key] = with_defaults(out[key], sub)
    return out
