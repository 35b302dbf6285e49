"""What a killed compression leaves for its retry: every finished layer, and what the next layer reads.

After decoder layer i is compressed, its checkpoint tensors (as the writer got them), its schemes
and its report go to `layer-i.pt`, then the hidden states layer i+1 reads to `activations-i.bin`
(raw rows, written piece by piece from wherever they are kept, memory or disk; the float model's
beside them in `activations-i-float.bin` when the recipe carries them) and `activations.json`,
which names those files and replaces the previous layer's. A retry replays the finished layers into a fresh writer in the
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
    from modelpress.engine.activations import Rows
    from modelpress.engine.pipeline import LayerReport

KEY_FILE = "key"
ACTIVATIONS = "activations.json"


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

    def _saved(self) -> dict | None:
        path = self.folder / ACTIVATIONS
        return json.loads(path.read_text()) if path.is_file() else None

    def _saved_after(self) -> int | None:
        saved = self._saved()
        return saved["after"] if saved is not None else None

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

    def load_activations(self, into: "Rows", float_into: "Rows | None" = None) -> None:
        """The saved hidden states into `into` (and the float model's into `float_into`), piece by piece."""
        saved = self._saved()
        assert saved is not None and saved["shape"] == [into.tokens, into.features] and saved["dtype"] == str(into.dtype)
        _read_rows(self.folder / saved["file"], into)
        if float_into is not None:
            if saved.get("float_file") is None:
                raise RuntimeError(f"{ACTIVATIONS} names no float hidden states, which this recipe carries")
            _read_rows(self.folder / saved["float_file"], float_into)

    def save_activations(self, after: int, hidden: "Rows", float_hidden: "Rows | None" = None) -> None:
        """The rows to files of their own, then the note naming them: a kill before the note leaves the previous set."""
        names = {"file": f"activations-{after:05d}.bin"}
        if float_hidden is not None:
            names["float_file"] = f"activations-{after:05d}-float.bin"
        for key, rows in (("file", hidden), ("float_file", float_hidden)):
            if rows is not None:
                _write_rows(rows, self.folder / names[key])
        note = {"after": after, **names, "shape": [hidden.tokens, hidden.features], "dtype": str(hidden.dtype)}
        _write_text(json.dumps(note), self.folder / ACTIVATIONS)
        for old in self.folder.glob("activations-*.bin"):
            if old.name not in names.values():
                old.unlink()


def _write_rows(rows: "Rows", path: Path) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with tmp.open("wb") as f:
        for piece in rows.chunks():
            f.write(memoryview(piece.detach().contiguous().cpu().view(torch.uint8).numpy()))
        os.fsync(f.fileno())
    tmp.replace(path)


def _read_rows(path: Path, into: "Rows") -> None:
    with path.open("rb") as f:
        for start in range(0, into.tokens, into.piece):
            rows = min(into.piece, into.tokens - start)
            buffer = torch.empty(rows * into.features * into.dtype.itemsize, dtype=torch.uint8)
            if f.readinto(memoryview(buffer.numpy())) != buffer.numel():
                raise RuntimeError(f"{path.name} is shorter than its note says ({[into.tokens, into.features]})")
            into.write(start, buffer.view(into.dtype).view(rows, into.features))


def _write_text(text: str, path: Path) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with tmp.open("w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    tmp.replace(path)


def _save(body: object, path: Path) -> None:
    """Written whole or not at all: a kill mid-write leaves the previous file."""
    tmp = path.with_name(f".{path.name}.tmp")
    torch.save(body, tmp)
    with tmp.open("rb") as f:
        os.fsync(f.fileno())
    tmp.replace(path)
