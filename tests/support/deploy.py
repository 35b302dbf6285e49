"""deploy/ as kustomize renders it, without kubectl: resources (recursively) with their patches merged."""

from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parents[2]
DEPLOY = REPO / "deploy"


def documents(path: Path) -> list[dict[str, Any]]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc]


def strategic_merge(base: Any, patch: Any) -> Any:
    """Kustomize's merge for what the overlays patch: maps key by key, lists of named items (or of
    mounts, by path) item by item, anything else replaced."""
    if isinstance(base, dict) and isinstance(patch, dict):
        return {**base, **{key: strategic_merge(base[key], value) if key in base else value for key, value in patch.items()}}
    if isinstance(base, list) and isinstance(patch, list) and all(isinstance(i, dict) for i in base + patch):
        key = next((k for k in ("name", "mountPath") if all(k in i for i in base + patch)), None)
        if key is not None:
            merged = {item[key]: item for item in base}
            for item in patch:
                merged[item[key]] = strategic_merge(merged[item[key]], item) if item[key] in merged else item
            return list(merged.values())
    return patch


def rendered(root: Path) -> list[dict[str, Any]]:
    """The objects a kustomization yields: its resources (recursively) with strategic patches merged by name."""
    kustomization = yaml.safe_load((root / "kustomization.yaml").read_text())
    objects: list[dict[str, Any]] = []
    for entry in kustomization.get("resources", []):
        target = (root / entry).resolve()
        assert target.exists(), f"{root}/kustomization.yaml: {entry} does not exist"
        objects += rendered(target) if target.is_dir() else documents(target)
    for patch in kustomization.get("patches", []):
        body = yaml.safe_load((root / patch["path"]).read_text())
        matches = [i for i, o in enumerate(objects) if o["kind"] == body["kind"] and o["metadata"]["name"] == body["metadata"]["name"]]
        assert len(matches) == 1, f"{patch['path']} patches nothing"
        objects[matches[0]] = strategic_merge(objects[matches[0]], body)
    return objects
