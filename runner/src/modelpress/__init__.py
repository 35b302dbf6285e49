"""ModelPress: compress Hugging Face LLMs into checkpoints that vLLM serves as they are.

The engine's public API is re-exported here lazily, so that importing a light part of the
package (the operator, the contract) never imports torch.
"""

from importlib import import_module
from typing import Any

__version__ = "0.1.0"

_ENGINE_EXPORTS = {
    "oneshot": "modelpress.engine.oneshot",
    "OneshotResult": "modelpress.engine.oneshot",
    "QuantizationModifier": "modelpress.engine.rtn",
    "GPTQModifier": "modelpress.engine.gptq",
    "SparseGPTModifier": "modelpress.engine.sparsegpt",
    "SmoothQuantModifier": "modelpress.engine.smoothquant",
    "AWQModifier": "modelpress.engine.awq",
    "SpinQuantModifier": "modelpress.engine.spinquant",
    "load_recipe": "modelpress.engine.recipe",
    "ModelPressError": "modelpress.engine.errors",
}

__all__ = ["__version__", *_ENGINE_EXPORTS]


def __getattr__(name: str) -> Any:
    if name in _ENGINE_EXPORTS:
        return getattr(import_module(_ENGINE_EXPORTS[name]), name)
    raise AttributeError(f"module 'modelpress' has no attribute {name!r}")
