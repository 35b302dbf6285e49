"""The API server's rules for names, labels and annotations, which neither kmock nor the OpenAPI
schemas check: a real server answers 422 to an object that breaks them."""

import json
import re
from collections.abc import Mapping
from typing import Any

SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
QUALIFIED = re.compile(r"^([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9]$")
LABEL_VALUE = re.compile(r"^(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?$")
MAX_ANNOTATIONS = 256 * 1024


def key_problems(field: str, key: str) -> list[str]:
    prefix, _, name = key.rpartition("/")
    found = []
    if prefix and (len(prefix) > 253 or not SUBDOMAIN.match(prefix)):
        found.append(f"{field}: key prefix {prefix!r} is not a DNS subdomain")
    if len(name) > 63 or not QUALIFIED.match(name):
        found.append(f"{field}: key name {name!r} must be a qualified name of at most 63 characters")
    return found


def labels_problems(field: str, labels: Mapping[str, str]) -> list[str]:
    found = []
    for key, value in labels.items():
        found += key_problems(f"{field}[{key}]", key)
        if len(value) > 63 or not LABEL_VALUE.match(value):
            found.append(f"{field}[{key}]: {value!r} must be a label value of at most 63 characters")
    return found


def metadata_problems(meta: Mapping[str, Any], field: str = "metadata", named: bool = True) -> list[str]:
    """What the API server's ObjectMeta validation would refuse."""
    found = []
    name = meta.get("name") or ""
    if named and (len(name) > 253 or not SUBDOMAIN.match(name)):
        found.append(f"{field}.name: {name!r} must be a DNS subdomain of at most 253 characters")
    found += labels_problems(f"{field}.labels", meta.get("labels") or {})
    annotations = meta.get("annotations") or {}
    for key in annotations:
        found += key_problems(f"{field}.annotations[{key}]", key)
    if len(json.dumps(annotations)) > MAX_ANNOTATIONS:
        found.append(f"{field}.annotations: more than 256 KiB")
    return found


def job_with_server_labels(job: dict[str, Any]) -> dict[str, Any]:
    """A Job as the API server stores it: its pod template labelled with the Job's name (which must
    therefore be a valid label value) and its uid."""
    meta = job["metadata"]
    template = dict(job["spec"]["template"])
    template_meta = dict(template.get("metadata") or {})
    names = {"batch.kubernetes.io/job-name": meta["name"], "job-name": meta["name"],
             "batch.kubernetes.io/controller-uid": meta["uid"], "controller-uid": meta["uid"]}
    template_meta["labels"] = {**(template_meta.get("labels") or {}), **names}
    template["metadata"] = template_meta
    return {**job, "spec": {**job["spec"], "template": template,
                            "selector": {"matchLabels": {"batch.kubernetes.io/controller-uid": meta["uid"]}}}}


def object_problems(obj: Mapping[str, Any]) -> list[str]:
    found = metadata_problems(obj.get("metadata") or {})
    if obj.get("kind") == "Job":
        found += metadata_problems((obj.get("spec") or {}).get("template", {}).get("metadata") or {},
                                   "spec.template.metadata", named=False)
    return found
