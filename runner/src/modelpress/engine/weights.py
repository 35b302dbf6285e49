"""Where weights come from: a model directory's safetensors shards, read one decoder layer at a time.

The model is built as a skeleton (parameters on the meta device, buffers real), so only the parts
being worked on occupy memory: the embeddings and head, plus one decoder layer at a time.
"""

import ctypes
import json
from pathlib import Path
from typing import Callable, Iterable

import torch
from accelerate import init_empty_weights
from transformers import AutoConfig, AutoModelForCausalLM, PretrainedConfig

from modelpress.engine.checkpoint_writer import SAFETENSORS_DTYPES
from modelpress.engine.errors import ModelPressError
from modelpress.paths import refuse_escaping_links

SAFETENSORS_TO_TORCH = {name: dtype for dtype, name in SAFETENSORS_DTYPES.items()}
HUB_FILES = ["*.json", "*.safetensors", "*.txt", "*.model", "*.jinja", "*.tiktoken"]


def resolve_model_dir(model: str | Path, revision: str | None = None) -> Path:
    """A local directory as it is; anything else is a hub id, fetched (or found in the hub cache)."""
    path = Path(model)
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelPressError(f"model: {path} has no config.json; point at a Hugging Face model directory")
        refuse_escaping_links(path, "model")
        return path
    if path.exists() or str(model).startswith((".", "/")) or str(model).count("/") != 1:
        raise ModelPressError(f"model: {model} is neither a model directory nor a hub id like org/name")
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    try:
        snapshot = Path(snapshot_download(str(model), revision=revision, allow_patterns=HUB_FILES))
    except (LocalEntryNotFoundError, HfHubHTTPError, OSError) as err:
        raise ModelPressError(f"model: cannot fetch {model} from the hub ({type(err).__name__}); check the id, revision and token") from None
    refuse_escaping_links(snapshot, "model")
    return snapshot


class SafetensorsSource:
    """Tensors by name from a directory's safetensors files (with or without an index).

    Tensors are read with plain positioned reads, not memory maps: a mapped shard stays resident
    as it is touched, which would bring the whole model into memory by the last layer.
    Names are the modules' (`rename` maps the checkpoint's names to them, see experts.py).
    """

    def __init__(self, model_dir: Path, rename: Callable[[str], str] = str) -> None:
        index = model_dir / "model.safetensors.index.json"
        if index.is_file():
            files = sorted({model_dir / f for f in json.loads(index.read_text())["weight_map"].values()})
        else:
            files = sorted(model_dir.glob("*.safetensors"))
        self.entries: dict[str, tuple[Path, str, list[int], int, int]] = {}
        for file in files:
            with file.open("rb") as f:
                size = int.from_bytes(f.read(8), "little")
                header = json.loads(f.read(size))
            for name, meta in header.items():
                if name != "__metadata__":
                    begin, end = meta["data_offsets"]
                    self.entries[rename(name)] = (file, meta["dtype"], meta["shape"], 8 + size + begin, end - begin)
        if not self.entries:
            raise ModelPressError(f"model: no safetensors weights in {model_dir}")
        self.files = files

    def names(self) -> set[str]:
        return set(self.entries)

    def get(self, name: str) -> torch.Tensor:
        file, dtype, shape, offset, length = self.entries[name]
        buffer = torch.empty(length, dtype=torch.uint8)
        with file.open("rb") as f:
            f.seek(offset)
            f.readinto(buffer.numpy())
        return buffer.view(SAFETENSORS_TO_TORCH[dtype]).reshape(shape)

    def nbytes(self) -> int:
        return sum(f.stat().st_size for f in self.files)


def load_config(model_dir: Path, trust_remote_code: bool = False) -> PretrainedConfig:
    return AutoConfig.from_pretrained(model_dir, trust_remote_code=trust_remote_code)


def build_skeleton(config: PretrainedConfig, trust_remote_code: bool = False) -> torch.nn.Module:
    """The model with every parameter on the meta device and real buffers (rotary tables)."""
    dtype = getattr(config, "dtype", None) or torch.float32
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype)
    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype, trust_remote_code=trust_remote_code)
    model.tie_weights()
    return model.eval()


def missing_weights(model: torch.nn.Module, source: SafetensorsSource) -> list[str]:
    """Parameters the checkpoint does not hold by the same name (tied weights excepted)."""
    names = source.names()
    seen: dict[int, str] = {}
    missing = []
    for name, param in model.named_parameters(remove_duplicate=False):
        if name in names:
            seen[id(param)] = name
    for name, param in model.named_parameters(remove_duplicate=False):
        if name not in names and id(param) not in seen:
            missing.append(name)
    return missing


def materialize(
    module: torch.nn.Module,
    prefix: str,
    source: SafetensorsSource,
    device: torch.device,
    skip_prefix: str | None = None,
) -> None:
    """Replace the meta parameters (and persistent buffers) under `module` with the checkpoint's."""
    names = source.names()
    for sub_name, sub in module.named_modules():
        full = f"{prefix}{sub_name}." if sub_name else prefix
        if skip_prefix and full.startswith(skip_prefix):
            continue
        for key, param in list(sub._parameters.items()):
            if param is None or f"{full}{key}" not in names:
                continue
            tensor = source.get(f"{full}{key}").to(device=device, dtype=param.dtype)
            sub._parameters[key] = torch.nn.Parameter(tensor, requires_grad=False)
        for key in list(sub._buffers):
            if key not in sub._non_persistent_buffers_set and f"{full}{key}" in names:
                sub._buffers[key] = source.get(f"{full}{key}").to(device)


def move_outside(model: torch.nn.Module, skip_prefix: str, device: torch.device) -> None:
    """Move every parameter and buffer outside the decoder layers (embeddings, norm, head)."""
    for name, sub in model.named_modules():
        if f"{name}.".startswith(skip_prefix):
            continue
        for key, param in sub._parameters.items():
            if param is not None and param.device != device and param.device.type != "meta":
                param.data = param.data.to(device)
        for key, buf in sub._buffers.items():
            if buf is not None and buf.device != device:
                sub._buffers[key] = buf.to(device)


def release(module: torch.nn.Module) -> None:
    """Drop a finished layer's tensors; its skeleton stays, so the model keeps its shape."""
    module.to("meta")
    trim_heap()


def trim_heap() -> None:
    """Hand freed pages back to the OS.

    glibc keeps freed blocks below its (self-raising) mmap threshold on the heap, where later,
    differently interleaved allocations fragment them: peak RSS then grows layer by layer instead
    of staying at one layer's worth. malloc_trim returns every free page, not just the heap's top.
    Forcing large blocks into their own mappings instead costs a page fault per temporary: a
    third more time per forward.
    """
    if _LIBC is not None:
        _LIBC.malloc_trim(0)


def _glibc() -> ctypes.CDLL | None:
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return None  # not glibc: nothing to trim
    return libc if hasattr(libc, "malloc_trim") else None


_LIBC = _glibc()


def find_decoder_layers(model: torch.nn.Module) -> tuple[str, torch.nn.ModuleList]:
    """The longest ModuleList of identical blocks: the decoder layers, found without tracing."""
    best: tuple[str, torch.nn.ModuleList] | None = None
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.ModuleList) and len(module) > 0:
            if len({type(m) for m in module}) == 1 and (best is None or len(module) > len(best[1])):
                best = (name, module)
    if best is None:
        raise ModelPressError(f"model: no list of decoder layers found in {type(model).__name__}")
    return best


def untie_from_embeddings(model: torch.nn.Module, names: Iterable[str]) -> None:
    """Give each named module whose weight is the input embeddings its own copy, before it is
    changed (quantized, or scaled), and record in the model's config that the two are no longer
    tied: the checkpoint's config.json is written from it, and a reader that saw them tied would
    put the embeddings back in the head's place."""
    embeddings = model.get_input_embeddings().weight if hasattr(model, "get_input_embeddings") else None
    if embeddings is None:
        return
    for name in names:
        module = model.get_submodule(name)
        if module.weight is embeddings:
            module.weight = torch.nn.Parameter(embeddings.data.clone(), requires_grad=False)
            model.config.tie_word_embeddings = False
