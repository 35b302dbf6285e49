"""The operator's RBAC rules in deploy/, and the API calls it made in a test, as (group, resource, verb)."""

from collections.abc import Iterable
from pathlib import Path
from typing import Any

import yaml
from kmock._internal import enums

RBAC = Path(__file__).resolve().parents[2] / "deploy" / "base" / "rbac.yaml"
ROLE = "modelpress-operator"
# The test client's User-Agent: every other request came from the operator (kopf or the Kubernetes client).
TEST_AGENT = "modelpress-tests"

Call = tuple[str, str, str]


def operator_rules() -> list[dict[str, Any]]:
    role = next(doc for doc in yaml.safe_load_all(RBAC.read_text()) if doc and doc["kind"] == "ClusterRole"
                and doc["metadata"]["name"] == ROLE)
    return role["rules"]


def _verb(request: Any) -> str:
    action = request.action
    if action == enums.action.LIST:
        return "list"
    if action == enums.action.WATCH:
        return "watch"
    if action == enums.action.FETCH:
        return "get"
    if action == enums.action.CREATE:
        return "create"
    if action == enums.action.DELETE:
        return "delete"
    return "update" if request.method == enums.method.PUT else "patch"


def operator_calls(requests: Iterable[Any]) -> set[Call]:
    """The resource calls among `requests` that did not come from the test itself."""
    calls = set()
    for request in requests:
        from_test = (request.headers.get("User-Agent") or "").startswith(TEST_AGENT)
        if from_test or request.resource is None or request.resource.plural is None:  # the test's, or discovery
            continue
        resource = request.resource.plural + (f"/{request.subresource}" if request.subresource else "")
        calls.add((request.resource.group or "", resource, _verb(request)))
    return calls


def grants(rules: list[dict[str, Any]]) -> set[Call]:
    return {(group, resource, verb) for rule in rules for group in rule["apiGroups"]
            for resource in rule["resources"] for verb in rule["verbs"]}


def unauthorized(calls: Iterable[Call], rules: list[dict[str, Any]] | None = None) -> list[Call]:
    """The calls the operator's ClusterRole does not allow."""
    granted = grants(operator_rules() if rules is None else rules)
    return sorted(call for call in calls if call not in granted)
