"""Where weights come from: a model directory's safetensors shards, read one decoder layer at a time.

The model is built as a skeleton (parameters on the meta device, buffers real), so only the parts
being worked on occupy memory: the embeddings and head, plus one decoder layer at a time.

A model directory is checked before any work (`check_model_dir`): its config.json, every shard's
header against the shard's size, and its tokenizer files, so a damaged or truncated download fails
with the file's name instead of turning into weights read from beyond a file's end.
"""

import ctypes
import json
import math
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable, Iterable, Protocol

import torch
import transformers
from accelerate import init_empty_weights
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PretrainedConfig
from transformers.models.auto.configuration_auto import CONFIG_MAPPING

from modelpress.contract import shown
from modelpress.engine.checkpoint_writer import SAFETENSORS_DTYPES
from modelpress.engine.errors import ModelPressError
from modelpress.paths import refuse_escaping_links

SAFETENSORS_TO_TORCH = {name: dtype for dtype, name in SAFETENSORS_DTYPES.items()}
HUB_FILES = ["*.json", "*.safetensors", "*.txt", "*.model", "*.jinja", "*.tiktoken"]
MAX_HEADER_BYTES = 100_000_000  # the safetensors format's own limit on a header
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "tokenizer.tiktoken")
REFETCH = "the file is damaged or incomplete; fetch the model again"

Entry = tuple[str, list[int], int, int]  # dtype, shape, offset in the file, length in bytes


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
        files = shard_files(model_dir)
        self.entries: dict[str, tuple[Path, str, list[int], int, int]] = {}
        for file in files:
            for name, (dtype, shape, offset, length) in read_header(file).items():
                self.entries[rename(name)] = (file, dtype, shape, offset, length)
        if not self.entries:
            raise ModelPressError(f"model: no safetensors weights in {model_dir}")
        self.files = files

    def names(self) -> set[str]:
        return set(self.entries)

    def get(self, name: str) -> torch.Tensor:
        file, dtype, shape, offset, length = self.entries[name]
        buffer = torch.empty(length, dtype=torch.uint8)
        view, got = memoryview(buffer.numpy()), 0
        with file.open("rb") as f:
            f.seek(offset)
            while got < length and (n := f.readinto(view[got:])):
                got += n
        if got != length:
            raise ModelPressError(f"model: {file.name}: tensor {name} is cut short ({got} of {length} bytes); "
                                  "the file changed or was truncated; fetch the model again")
        return buffer.view(SAFETENSORS_TO_TORCH[dtype]).reshape(shape)

    def nbytes(self) -> int:
        return sum(f.stat().st_size for f in self.files)


class TensorSource(Protocol):
    def names(self) -> set[str]: ...

    def get(self, name: str) -> torch.Tensor: ...


class LayerTensors:
    """One decoder layer's tensors, read already, standing in for the source they came from."""

    def __init__(self, tensors: dict[str, torch.Tensor]) -> None:
        self.tensors = tensors

    def names(self) -> set[str]:
        return set(self.tensors)

    def get(self, name: str) -> torch.Tensor:
        return self.tensors.pop(name)  # handed over: the layer's parameter is now its only holder


class ReadAhead:
    """Reads the next decoder layer's tensors on a thread of its own while the current layer is
    worked on. File reads release the GIL, and a compression's threads are busy only inside its
    larger products, so the read costs no wall time; one more layer's weights are held meanwhile."""

    def __init__(self, source: SafetensorsSource) -> None:
        self.source = source
        self.pool = ThreadPoolExecutor(1, thread_name_prefix="read-ahead")
        self.pending: dict[str, Future[LayerTensors]] = {}

    def start(self, prefix: str) -> None:
        names = sorted(n for n in self.source.names() if n.startswith(prefix))
        self.pending[prefix] = self.pool.submit(lambda: LayerTensors({n: self.source.get(n) for n in names}))

    def take(self, prefix: str) -> LayerTensors:
        """The layer's tensors: read ahead when `start` asked for them, else now."""
        if prefix not in self.pending:
            self.start(prefix)
        return self.pending.pop(prefix).result()

    def close(self) -> None:
        for future in self.pending.values():
            future.cancel()
        self.pending.clear()
        self.pool.shutdown(wait=True)


def shard_files(model_dir: Path) -> list[Path]:
    """The safetensors files of a model: those its index names, else every one in the directory."""
    index = model_dir / "model.safetensors.index.json"
    if not index.is_file():
        return sorted(model_dir.glob("*.safetensors"))
    try:
        names = set(json.loads(index.read_text(encoding="utf-8"))["weight_map"].values())
    except (UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError, AttributeError):
        raise ModelPressError(f"model: {index.name} is not a safetensors index (JSON with a weight_map); {REFETCH}") from None
    files = sorted(model_dir / str(n) for n in names)
    missing = [f.name for f in files if not f.is_file() or f.parent != model_dir]
    if missing:
        raise ModelPressError(f"model: {index.name} names {missing[0]}, which is not in the model directory; fetch the model again")
    return files


def read_header(file: Path) -> dict[str, Entry]:
    """A safetensors file's tensors, each checked against the header's own rules and the file's size."""
    size = file.stat().st_size
    where = f"model: {file.name}"
    with file.open("rb") as f:
        prefix = f.read(8)
        length = int.from_bytes(prefix, "little")
        if len(prefix) < 8 or length > min(size - 8, MAX_HEADER_BYTES):
            raise ModelPressError(f"{where}: its header claims {length} bytes but the file holds {size}; {REFETCH}")
        try:
            header = json.loads(f.read(length))
        except (UnicodeDecodeError, json.JSONDecodeError):
            header = None
    if not isinstance(header, dict):
        raise ModelPressError(f"{where}: its header is not a JSON object of tensors; {REFETCH}")
    data = size - 8 - length
    entries: dict[str, Entry] = {}
    for name, meta in header.items():
        if name == "__metadata__":
            continue
        entry = _entry(meta)
        if entry is None:
            raise ModelPressError(f"{where}: the header's entry for {shown(name)} is not a valid tensor; {REFETCH}")
        dtype, shape, begin, end = entry
        if end > data:
            raise ModelPressError(f"{where}: holds {size} bytes but tensor {shown(name)} ends at byte {8 + length + end}; "
                                  "the file is truncated; fetch the model again")
        entries[name] = (dtype, shape, 8 + length + begin, end - begin)
    described = max((offset + n for _, _, offset, n in entries.values()), default=8 + length)
    if described != size:
        raise ModelPressError(f"{where}: holds {size} bytes but its header describes {described}; {REFETCH}")
    return entries


def _entry(meta: Any) -> tuple[str, list[int], int, int] | None:
    """(dtype, shape, begin, end) of one header entry, or None when it breaks the format."""
    if not isinstance(meta, dict):
        return None
    dtype, shape, offsets = meta.get("dtype"), meta.get("shape"), meta.get("data_offsets")
    if dtype not in SAFETENSORS_TO_TORCH or not isinstance(shape, list) or not isinstance(offsets, list) or len(offsets) != 2:
        return None
    if not all(type(v) is int and v >= 0 for v in (*shape, *offsets)):
        return None
    begin, end = offsets
    if end - begin != math.prod(shape) * SAFETENSORS_TO_TORCH[dtype].itemsize:
        return None
    return dtype, shape, begin, end


def load_config(model_dir: Path, trust_remote_code: bool = False) -> PretrainedConfig:
    """The model's config; a config.json that transformers cannot use stops here, named with the fix."""
    try:
        body = json.loads((model_dir / "config.json").read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ModelPressError(f"model: {model_dir} has no config.json; point at a Hugging Face model directory") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ModelPressError(f"model: config.json is not valid JSON ({err}); fix it or fetch the model again") from None
    model_type = body.get("model_type") if isinstance(body, dict) else None
    if not isinstance(model_type, str) or not model_type:
        raise ModelPressError("model: config.json has no model_type; is it a transformers model's config?")
    if model_type not in CONFIG_MAPPING and not (trust_remote_code and "auto_map" in body):
        raise ModelPressError(
            f"model: config.json has model_type {shown(model_type)}, which transformers {transformers.__version__} does not "
            "know; upgrade transformers, or trust the remote code of a model that brings its own"
        )
    try:
        return AutoConfig.from_pretrained(model_dir, trust_remote_code=trust_remote_code)
    except (ValueError, TypeError, KeyError) as err:
        reason = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise ModelPressError(f"model: config.json cannot be read by transformers ({reason}); fix it or fetch the model again") from None


def load_tokenizer(model: Path | str, trust_remote_code: bool = False) -> Any:
    """The tokenizer of a model directory (or hub id); missing or broken tokenizer files stop here, named with the fix."""
    local = Path(model).is_dir()
    if local:
        require_tokenizer_files(Path(model))
    try:
        return AutoTokenizer.from_pretrained(model, trust_remote_code=trust_remote_code)
    except (OSError, ValueError, TypeError) as err:
        if not local or (isinstance(err, OSError) and err.errno is not None):  # the hub or the disk failed: worth a retry
            raise
        reason = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise ModelPressError(f"model: the tokenizer files cannot be loaded ({reason}); fix them or fetch the model again") from None


def require_tokenizer_files(model_dir: Path) -> None:
    if not any((model_dir / name).is_file() for name in TOKENIZER_FILES):
        raise ModelPressError(
            f"model: no tokenizer ({', '.join(TOKENIZER_FILES)}) beside config.json; add the base model's tokenizer files"
        )


def check_model_dir(model_dir: Path, trust_remote_code: bool = False) -> None:
    """Everything about a model directory that can fail before any work: config, shards, tokenizer files."""
    load_config(model_dir, trust_remote_code)
    SafetensorsSource(model_dir)
    require_tokenizer_files(model_dir)


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
    source: TensorSource,
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


def release_outside(model: torch.nn.Module, skip_prefix: str) -> None:
    """Drop the parameters outside the decoder layers (embeddings, norm, head) back to the meta
    device, for `materialize` to read again; buffers (rotary tables) stay."""
    for name, sub in model.named_modules():
        if f"{name}.".startswith(skip_prefix):
            continue
        for key, param in sub._parameters.items():
            if param is not None and param.device.type != "meta":
                sub._parameters[key] = torch.nn.Parameter(param.data.to("meta"), requires_grad=False)
    trim_heap()


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
