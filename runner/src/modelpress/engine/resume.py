"""What a killed compression leaves for its retry: every finished layer, and what the next layer reads.

After decoder layer i is compressed, its checkpoint tensors (as the writer got them), its schemes
and its report go to `layer-i.pt`, then the activations layer i+1 reads to `activations.pt`
(replacing the previous layer's). A retry replays the finished layers into a fresh writer in the
same order, which gives the same shards byte for byte, and continues at the first unfinished
layer. A layer whose activations were not saved yet is redone: a kill costs at most one layer.

Everything is keyed by what the layers were computed from (`resume_key`): another recipe, other
calibration tokens or another source never resumes from this state, it wipes it.
"""

import dataclasses
import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from compressed_tensors.quantization import QuantizationScheme

from modelpress.engine.checkpoint_writer import TensorSink

if TYPE_CHECKING:  # the pipeline imports this module
    from modelpress.engine.pipeline import LayerReport

KEY_FILE = "key"
ACTIVATIONS = "activations.pt"


def resume_key(recipe: str, samples: list[torch.Tensor], model_dir: Path, layers: int) -> str:
    """The recipe, the calibration tokens, the source's config and weight files (name, size, mtime), the depth."""
    digest = hashlib.sha256(recipe.encode())
    for ids in samples:
        digest.update(ids.to(torch.int64).numpy().tobytes() + b"|")
    files = sorted(p for p in model_dir.iterdir() if p.suffix in (".json", ".safetensors"))
    digest.update(json.dumps([(p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in files]).encode())
    digest.update(str(layers).encode())
    return digest.hexdigest()


@dataclasses.dataclass
class FinishedLayer:
    tensors: dict[str, torch.Tensor]  # in the order they were written
    schemes: dict[str, QuantizationScheme]
    report: "LayerReport"


class LayerRecorder:
    """Stands in for the writer while a layer is written: keeps each tensor (on the CPU) and passes it on."""

    def __init__(self, writer: TensorSink | None) -> None:
        self.writer = writer
        self.tensors: dict[str, torch.Tensor] = {}

    def add(self, name: str, tensor: torch.Tensor) -> None:
        kept = tensor.detach().to("cpu").contiguous()
        self.tensors[name] = kept
        if self.writer is not None:
            self.writer.add(name, kept)


class ResumeState:
    """The per-layer state of one compression in `folder`, valid for `key` only."""

    def __init__(self, folder: Path, key: str) -> None:
        self.folder = folder
        if not (folder / KEY_FILE).is_file() or (folder / KEY_FILE).read_text() != key:
            shutil.rmtree(folder, ignore_errors=True)
            folder.mkdir(parents=True)
            (folder / KEY_FILE).write_text(key)

    def _layer(self, i: int) -> Path:
        return self.folder / f"layer-{i:05d}.pt"

    def finished(self, layers: int, needs_activations: bool) -> int:
        """How many layers, from the first, are finished with everything the next one needs."""
        done = 0
        while done < layers and self._layer(done).is_file():
            done += 1
        if needs_activations and done:
            saved = self._saved_after()
            done = min(done, saved + 1) if saved is not None else 0
        return done

    def _saved_after(self) -> int | None:
        path = self.folder / ACTIVATIONS
        return torch.load(path, weights_only=True, mmap=True)["after"] if path.is_file() else None  # the tensors stay unread

    def load_layer(self, i: int) -> FinishedLayer:
        from modelpress.engine.pipeline import LayerReport

        body = torch.load(self._layer(i), weights_only=True)
        schemes = {n: QuantizationScheme.model_validate(s) for n, s in body["schemes"].items()}
        return FinishedLayer(dict(zip(body["names"], body["tensors"])), schemes, LayerReport(**body["report"]))

    def save_layer(self, i: int, layer: FinishedLayer) -> None:
        body = {
            "names": list(layer.tensors),
            "tensors": list(layer.tensors.values()),
            "schemes": {n: s.model_dump(mode="json") for n, s in layer.schemes.items()},
            "report": dataclasses.asdict(layer.report),
        }
        _save(body, self._layer(i))

    def load_activations(self, device: torch.device) -> list[torch.Tensor]:
        return torch.load(self.folder / ACTIVATIONS, map_location=device, weights_only=True)["hidden"]

    def save_activations(self, after: int, hidden: list[torch.Tensor]) -> None:
        _save({"after": after, "hidden": [h.detach().to("cpu") for h in hidden]}, self.folder / ACTIVATIONS)


def _save(body: object, path: Path) -> None:
    """Written whole or not at all: a kill mid-write leaves the previous file."""
    tmp = path.with_name(f".{path.name}.tmp")
    torch.save(body, tmp)
    with tmp.open("rb") as f:
        os.fsync(f.fileno())
    tmp.replace(path)
