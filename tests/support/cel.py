"""The CRD's CEL rules (`x-kubernetes-validations`) run with cel-python, as the API server runs them:
each rule on the value at its own node, once defaults are applied; a transition rule (one that reads
`oldSelf`) only on an update, where the old object has that node too."""

import functools
from typing import Any

import celpy

ENVIRONMENT = celpy.Environment()


@functools.cache
def _program(rule: str) -> Any:
    return ENVIRONMENT.program(ENVIRONMENT.compile(rule))


def holds(rule: str, value: Any, old: Any = None) -> bool:
    """Whether one rule accepts `value` (an evaluation error rejects, as on the API server)."""
    activation = {"self": celpy.json_to_cel(value)}
    if old is not None:
        activation["oldSelf"] = celpy.json_to_cel(old)
    try:
        result = _program(rule).evaluate(activation)
    except celpy.CELEvalError:
        return False
    return isinstance(result, celpy.celtypes.BoolType) and bool(result)


def violations(schema: dict[str, Any], value: Any, old: Any = None, path: str = "") -> list[str]:
    """`path: message` for every rule the object breaks, walking the schema with it."""
    found = []
    for rule in schema.get("x-kubernetes-validations") or []:
        transition = "oldSelf" in rule["rule"]
        if transition and old is None:
            continue
        if not holds(rule["rule"], value, old if transition else None):
            found.append(f"{path or '(root)'}: {rule['message']}")
    if isinstance(value, dict):
        for key, sub in (schema.get("properties") or {}).items():
            if key in value:
                found += violations(sub, value[key], old.get(key) if isinstance(old, dict) else None, f"{path}.{key}")
    if isinstance(value, list) and "items" in schema:
        for index, item in enumerate(value):
            found += violations(schema["items"], item, None, f"{path}[{index}]")
    return found
