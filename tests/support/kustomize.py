"""`kubectl kustomize`: an overlay rendered exactly as `kubectl apply -k` would send it."""

import shutil
import subprocess
from pathlib import Path
from typing import Any

import yaml


def kustomize(root: Path) -> list[dict[str, Any]]:
    """The objects `root`'s kustomization yields; needs kubectl (its built-in kustomize) on PATH."""
    kubectl = shutil.which("kubectl")
    assert kubectl, "kubectl is needed to render kustomizations (kubectl kustomize)"
    done = subprocess.run([kubectl, "kustomize", str(root)], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    return [doc for doc in yaml.safe_load_all(done.stdout) if doc]
