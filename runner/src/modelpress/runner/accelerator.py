"""The GPUs a pod was given, checked against the torch its image carries, before any work starts."""

from collections.abc import Mapping

import torch

from modelpress.contract import GPU_IMAGE_SETTING, Env
from modelpress.engine.errors import ModelPressError


def require_gpu(env: Mapping[str, str]) -> None:
    """A pod given GPUs (`Env.GPUS`) needs a torch that can use them; a CPU-only build would run the
    job on the CPU instead, silently and for hours. That is the image's fault (exit 2, naming the
    setting to change); a CUDA build that sees no GPU is the node's (retryable)."""
    asked = int(env.get(Env.GPUS) or 0)
    if not asked or torch.cuda.is_available():
        return
    if torch.version.cuda is None and torch.version.hip is None:
        raise ModelPressError(
            f"spec.runtime.resources.gpus: the job asks for {asked} GPU(s) but the runner image has a CPU-only torch "
            f"({torch.__version__}); set {GPU_IMAGE_SETTING} in the operator's settings (or spec.runtime.image) "
            "to a runner image built for CUDA")
    raise RuntimeError(f"the pod was given {asked} GPU(s) but torch {torch.__version__} (CUDA {torch.version.cuda}) "
                       "sees none; the node's driver or device plugin is at fault")
