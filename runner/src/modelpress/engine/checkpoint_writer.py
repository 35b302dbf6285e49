"""The checkpoint writer: every file of the output, a Hugging Face model directory in
compressed-tensors format.

Tensors are streamed: appended to a shard's data file as soon as a layer is done, with the
safetensors header written when the shard closes, so memory holds one layer, never the model.
The rest (config.json with its quantization_config, the recipe, tokenizer and generation config,
the per-layer report) is written once the weights are.
"""

import copy
import json
import shutil
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO, Callable, Protocol

import compressed_tensors
import torch
from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32
from compressed_tensors.config import CompressionFormat
from compressed_tensors.quantization import QuantizationConfig, QuantizationScheme

from modelpress.contract import human_bytes  # noqa: F401  (the engine's callers import it from here)
from modelpress.engine.errors import ModelPressError
from modelpress.engine.quantize import QuantizedLinear
from modelpress.engine.schemes import compression_format

if TYPE_CHECKING:  # the pipeline imports this module to stream layers out
    from modelpress.engine.pipeline import LayerReport

REPORT_FILE = "modelpress-report.json"

SAFETENSORS_DTYPES = {
    torch.float64: "F64",
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.float8_e4m3fn: "F8_E4M3",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.int16: "I16",
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.bool: "BOOL",
}
AUX_FILES = [
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "merges.txt",
    "tokenizer.model",
    "chat_template.jinja",
    "chat_template.json",
    "generation_config.json",
    "preprocessor_config.json",
]


@dataclass
class _Shard:
    data_path: Path
    handle: BinaryIO
    header: dict[str, Any] = field(default_factory=dict)
    size: int = 0


class ShardedSafetensorsWriter:
    """Write tensors one by one into shards of at most `max_shard_bytes`, then an index.

    `rename` turns a module's tensor name into the checkpoint's (see experts.py).
    """

    def __init__(self, out_dir: Path, max_shard_bytes: int = 5 * 2**30, rename: Callable[[str], str] = str) -> None:
        self.out_dir = out_dir
        self.max_shard_bytes = max_shard_bytes
        self.rename = rename
        self.shards: list[_Shard] = []
        self.names: set[str] = set()

    def add(self, name: str, tensor: torch.Tensor) -> None:
        name = self.rename(name)
        if name in self.names:
            raise ValueError(f"tensor {name} written twice")
        t = tensor.detach().to("cpu").contiguous()
        data = t.reshape(-1).view(torch.uint8).numpy()
        shard = self.shards[-1] if self.shards else None
        if shard is None or (shard.size and shard.size + data.nbytes > self.max_shard_bytes):
            shard = self._new_shard()
        shard.header[name] = {
            "dtype": SAFETENSORS_DTYPES[t.dtype],
            "shape": list(t.shape),
            "data_offsets": [shard.size, shard.size + data.nbytes],
        }
        shard.handle.write(memoryview(data))
        shard.size += data.nbytes
        self.names.add(name)

    def close(self) -> list[Path]:
        """Assemble each shard (header, then its data) and write the index; return the files."""
        count = len(self.shards)
        files, weight_map = [], {}
        for i, shard in enumerate(self.shards, 1):
            shard.handle.close()
            path = self.out_dir / f"model-{i:05d}-of-{count:05d}.safetensors"
            header = json.dumps({"__metadata__": {"format": "pt"}, **shard.header}, separators=(",", ":")).encode()
            header += b" " * (-len(header) % 8)
            with path.open("wb") as out, shard.data_path.open("rb") as data:
                out.write(len(header).to_bytes(8, "little"))
                out.write(header)
                shutil.copyfileobj(data, out, 16 * 2**20)
            shard.data_path.unlink()
            weight_map.update({name: path.name for name in shard.header})
            files.append(path)
        index = {"metadata": {"total_size": sum(s.size for s in self.shards)}, "weight_map": dict(sorted(weight_map.items()))}
        (self.out_dir / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
        return files

    def _new_shard(self) -> _Shard:
        path = self.out_dir / f".shard-{len(self.shards) + 1:05d}.data"
        shard = _Shard(path, path.open("wb"))
        self.shards.append(shard)
        return shard


def compressed_tensors_of(name: str, ql: QuantizedLinear) -> dict[str, torch.Tensor]:
    """The tensors compressed-tensors' readers expect for one quantized Linear's weight."""
    args = ql.scheme.weights
    fmt = compression_format(ql.scheme)
    zp = ql.qparams.zero_point
    out: dict[str, torch.Tensor] = {}
    if fmt == CompressionFormat.pack_quantized:
        out[f"{name}.weight_packed"] = pack_to_int32(ql.q.cpu(), args.num_bits)
        out[f"{name}.weight_shape"] = torch.tensor(list(ql.q.shape), dtype=torch.int64)
        if zp is not None:
            out[f"{name}.weight_zero_point"] = pack_to_int32(zp.cpu(), args.num_bits, packed_dim=0)
    else:
        out[f"{name}.weight"] = ql.q
        if zp is not None:
            out[f"{name}.weight_zero_point"] = zp
    out[f"{name}.weight_scale"] = ql.qparams.scale
    if ql.input_qparams is not None:
        out[f"{name}.input_scale"] = ql.input_qparams.scale
        if ql.input_qparams.zero_point is not None:
            out[f"{name}.input_zero_point"] = ql.input_qparams.zero_point
    return out


class TensorSink(Protocol):
    """Where a module's tensors go: the checkpoint writer, or something that records them on the way."""

    def add(self, name: str, tensor: torch.Tensor) -> None: ...


def write_module(
    writer: TensorSink,
    prefix: str,
    module: torch.nn.Module,
    quantized: dict[str, QuantizedLinear],
    skip_prefix: str | None = None,
) -> None:
    """Write a module's state: quantized Linears in compressed form, everything else as it is.

    Tied tensors (an input embedding shared with the head) are stored once, as transformers does.
    """
    written: set[tuple[int, tuple[int, ...]]] = set()
    for name, tensor in module.state_dict().items():
        full = f"{prefix}{name}"
        owner = full.rsplit(".", 1)[0]
        if (skip_prefix and full.startswith(skip_prefix)) or (owner in quantized and full.endswith(".weight")):
            continue
        key = (tensor.data_ptr(), tuple(tensor.shape))
        if key in written:
            continue
        written.add(key)
        writer.add(full, tensor)
    for name, ql in quantized.items():
        if name.startswith(prefix):
            for key, tensor in compressed_tensors_of(name, ql).items():
                writer.add(key, tensor)


def quantization_config(
    groups: dict[str, QuantizationScheme], quantized: dict[str, QuantizationScheme], ignore: list[str]
) -> dict[str, Any]:
    """The `quantization_config` block of config.json, built with compressed-tensors' own models."""
    used = {id(scheme) for scheme in quantized.values()}
    config_groups = {}
    for name, scheme in groups.items():
        if id(scheme) in used:
            config_groups[name] = scheme.model_copy(update={"format": compression_format(scheme).value})
    formats = {g.format for g in config_groups.values()}
    model_format = formats.pop() if len(formats) == 1 else CompressionFormat.mixed_precision.value
    config = QuantizationConfig(
        config_groups=config_groups,
        format=model_format,
        quantization_status="compressed",
        ignore=sorted(ignore),
    ).model_dump(mode="json")
    config.update(version=compressed_tensors.__version__, sparsity_config={}, transform_config={})
    return config


def prepare_output_dir(output_dir: str | Path | None) -> Path | None:
    """The output directory, created; refused when it is a file or already holds a model."""
    if output_dir is None:
        return None
    out = Path(output_dir)
    if out.exists() and not out.is_dir():
        raise ModelPressError(f"output_dir: {out} is a file; give a directory")
    if out.is_dir() and any(out.glob("*.safetensors")):
        raise ModelPressError(f"output_dir: {out} already holds a model; choose an empty directory or remove it")
    out.mkdir(parents=True, exist_ok=True)
    return out


def write_metadata(
    out: Path,
    model: torch.nn.Module,
    groups: list[Mapping[str, QuantizationScheme]],
    schemes: dict[str, QuantizationScheme],
    recipe: str,
    model_dir: Path | None,
    tokenizer: Any,
    rename: Callable[[str], str] = str,
) -> None:
    """config.json with its quantization_config, the recipe, tokenizer and generation config.

    The config is the model's own as it is now, so what compression changed in it (a head
    untied from the embeddings) is saved; `groups` are each quantizing modifier's groups, in
    recipe order, and `rename` gives a module's name in the checkpoint (see experts.py).
    """
    merged: dict[str, QuantizationScheme] = {}
    for modifier_groups in groups:
        for name, scheme in modifier_groups.items():
            merged[name if name not in merged else f"{name}_{len(merged)}"] = scheme
    ignore = [rename(n) for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and n not in schemes]
    config = copy.deepcopy(model.config)  # the quantization_config belongs to the checkpoint, not the model
    if schemes:
        config.quantization_config = quantization_config(merged, schemes, ignore)
    config.save_pretrained(out)
    (out / "recipe.yaml").write_text(recipe)
    copy_aux_files(model_dir, out)
    if model_dir is None and tokenizer is not None:
        tokenizer.save_pretrained(out)
    if not (out / "generation_config.json").is_file() and getattr(model, "generation_config", None) is not None:
        model.generation_config.save_pretrained(out)


def write_report(out: Path, reports: list["LayerReport"]) -> None:
    """Per-layer losses and achieved sparsity: the checkpoint format has no place for them, and
    pruned weights are stored dense, so this file is where a reader finds them."""
    layers = [
        {
            "layer": r.index,
            "seconds": round(r.seconds, 3),
            "sequential": r.sequential,
            "loss": r.losses,
            "sparsity": r.sparsity,
            "dampening_raised": r.dampening,
        }
        for r in reports
    ]
    total = [s for r in reports for s in r.sparsity.values()]
    summary = {"mean_sparsity": round(sum(total) / len(total), 6) if total else 0.0}
    (out / REPORT_FILE).write_text(json.dumps({**summary, "layers": layers}, indent=1) + "\n")


def copy_aux_files(model_dir: Path | None, out_dir: Path) -> None:
    """Tokenizer, chat template and generation config travel unchanged with the weights."""
    if model_dir is None:
        return
    for name in AUX_FILES:
        if (model_dir / name).is_file():
            shutil.copy2(model_dir / name, out_dir / name)


def model_bytes(model_dir: Path) -> int:
    """The size of a model directory's weights: its safetensors files."""
    return sum(p.stat().st_size for p in model_dir.glob("*.safetensors"))


