"""Where calibration activations are kept while the layers are compressed: in memory as computed,
in memory in a 16-bit dtype, or on disk.

Every activation the layer pass keeps for all calibration tokens (the hidden states between
layers, a norm's output, the attention's and the MLP's inner activations) is a [tokens, features]
matrix, `Rows`, held in pieces of a fixed number of rows. The parts of a layer read and write it
one piece at a time, so only the storage differs between the kinds:

- `memory`: the tensors as computed, in the model's dtype; pieces are views of them;
- `bfloat16` / `float16`: stored in 16 bits, each piece widened to the dtype it was computed in
  when read and narrowed again when written back, so all arithmetic stays in the model's dtype;
- `disk`: every piece is a file in a folder of the job's scratch volume, memory-mapped while it is
  read or written and unmapped after, so only the pieces in use are resident. The bytes are the
  ones `memory` keeps: a spilled run computes exactly what an in-memory run computes.
"""

import itertools
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import torch

from modelpress.contract import ActivationStorage
from modelpress.engine.errors import ModelPressError

COMPACT = {"bfloat16": torch.bfloat16, "float16": torch.float16}


class Rows:
    """A [tokens, features] activation matrix in pieces of `piece` rows.

    `chunks()` yields the pieces for reading; changes to them must go through `update`, which is
    what writes them back where the storage is not the tensor itself (the 16-bit kinds).
    """

    def __init__(self, tokens: int, features: int, dtype: torch.dtype, piece: int) -> None:
        self.tokens, self.features, self.dtype, self.piece = tokens, features, dtype, piece

    @property
    def pieces(self) -> int:
        return -(-self.tokens // self.piece)

    def _span(self, k: int) -> tuple[int, int]:
        return k * self.piece, min((k + 1) * self.piece, self.tokens)

    def _load(self, k: int) -> torch.Tensor:
        """Piece k in `dtype`: the stored tensor itself where it can be, else a widened copy."""
        raise NotImplementedError

    def _store(self, k: int, value: torch.Tensor) -> None:
        """Piece k's new value, when `_load` gave a copy."""

    def _drop(self, k: int) -> None:
        """Release piece k's storage: it is never read again."""

    def chunks(self) -> Iterator[torch.Tensor]:
        for k in range(self.pieces):
            yield self._load(k)

    def drain(self) -> Iterator[torch.Tensor]:
        """The pieces once more, each released as soon as the next is asked for."""
        for k in range(self.pieces):
            piece = self._load(k)
            yield piece
            del piece
            self._drop(k)

    def update(self, change: Callable[..., None], *others: "Rows") -> None:
        """change(piece, *the others' pieces) on every piece, in place: the others have the same rows."""
        for k, parts in enumerate(zip(self.chunks(), *(o.chunks() for o in others))):
            change(*parts)
            self._store(k, parts[0])

    def read(self, start: int, end: int) -> torch.Tensor:
        """Rows start..end in `dtype` (a view where they lie in one piece kept in memory)."""
        first, last = start // self.piece, (end - 1) // self.piece
        parts = [self._load(k)[max(start - k * self.piece, 0) : end - k * self.piece] for k in range(first, last + 1)]
        return parts[0] if len(parts) == 1 else torch.cat(parts)

    def write(self, start: int, values: torch.Tensor) -> None:
        """Rows from `start` on become `values` (in `dtype`)."""
        end = start + values.shape[0]
        for k in range(start // self.piece, (end - 1) // self.piece + 1):
            lo, hi = self._span(k)
            piece = self._load(k)
            a, b = max(start, lo), min(end, hi)
            piece[a - lo : b - lo] = values[a - start : b - start]
            self._store(k, piece)

    def close(self) -> None:
        """Release every piece."""
        for k in range(self.pieces):
            self._drop(k)


class MemoryRows(Rows):
    """Pieces kept as tensors: views of one buffer, or (`separate`) a tensor each, so that each
    piece's memory goes back as it is drained."""

    def __init__(self, tokens: int, features: int, dtype: torch.dtype, piece: int, device: torch.device,
                 kept: torch.dtype | None = None, separate: bool = False) -> None:
        super().__init__(tokens, features, dtype, piece)
        self.kept = kept or dtype
        self.base: torch.Tensor | None = None
        if separate:
            self.parts: list[torch.Tensor | None] = [
                torch.empty(hi - lo, features, dtype=self.kept, device=device) for lo, hi in map(self._span, range(self.pieces))]
        else:
            self.base = torch.empty(tokens, features, dtype=self.kept, device=device)
            self.parts = list(self.base.split(piece))

    def _load(self, k: int) -> torch.Tensor:
        part = self._load_kept(k)
        return part if self.kept == self.dtype else part.to(self.dtype)

    def _store(self, k: int, value: torch.Tensor) -> None:
        if self.kept != self.dtype:
            self.parts[k].copy_(value)  # type: ignore[union-attr]

    def _drop(self, k: int) -> None:
        self.parts[k] = None
        if all(p is None for p in self.parts):
            self.base = None

    def write(self, start: int, values: torch.Tensor) -> None:
        """Straight into the kept pieces (narrowed on the way in): no widened copy of a whole piece
        for a write of a few rows."""
        end = start + values.shape[0]
        for k in range(start // self.piece, (end - 1) // self.piece + 1):
            lo, hi = self._span(k)
            a, b = max(start, lo), min(end, hi)
            self._load_kept(k)[a - lo : b - lo].copy_(values[a - start : b - start])

    def _load_kept(self, k: int) -> torch.Tensor:
        part = self.parts[k]
        if part is None:
            raise RuntimeError(f"activation rows {self._span(k)} were read after they were released")
        return part

    def read(self, start: int, end: int) -> torch.Tensor:
        if self.base is not None and self.kept == self.dtype:
            return self.base[start:end]
        return super().read(start, end)


class DiskRows(Rows):
    """Pieces as files in `folder`, each mapped only while it is used."""

    def __init__(self, tokens: int, features: int, dtype: torch.dtype, piece: int, folder: Path) -> None:
        super().__init__(tokens, features, dtype, piece)
        self.folder = folder
        for k in range(self.pieces):
            lo, hi = self._span(k)
            with self._path(k).open("wb") as f:
                f.truncate((hi - lo) * features * dtype.itemsize)

    def _path(self, k: int) -> Path:
        return self.folder / f"{k:06d}.bin"

    def _load(self, k: int) -> torch.Tensor:
        lo, hi = self._span(k)
        path = self._path(k)
        if not path.is_file():
            raise RuntimeError(f"activation rows {lo}..{hi} were read after they were released")
        flat = torch.from_file(str(path), shared=True, size=(hi - lo) * self.features, dtype=self.dtype)
        return flat.view(hi - lo, self.features)

    def _drop(self, k: int) -> None:
        self._path(k).unlink(missing_ok=True)

    def close(self) -> None:
        shutil.rmtree(self.folder, ignore_errors=True)


@dataclass
class Storage:
    """Makes the `Rows` of one compression, all of one kind; `close` removes whatever is left on disk."""

    kind: ActivationStorage = "memory"
    spill_dir: Path | None = None  # disk: the scratch folder the pieces go under (a folder of their own in it)
    device: torch.device = torch.device("cpu")

    def __post_init__(self) -> None:
        if self.kind not in ("memory", "disk", *COMPACT):
            raise ModelPressError(f"activation_storage: {self.kind!r} is not one of memory, bfloat16, float16, disk")
        self._folder: Path | None = None
        self._serial = itertools.count()
        if self.kind == "disk":
            if self.spill_dir is None:
                raise ModelPressError("activation_storage: disk needs a scratch folder for the activations; pass spill_dir")
            if self.device.type != "cpu":
                raise ModelPressError("activation_storage: disk keeps activations for a CPU run; use memory on an accelerator")
            self.spill_dir.mkdir(parents=True, exist_ok=True)
            self._folder = Path(tempfile.mkdtemp(prefix="activations-", dir=self.spill_dir))

    def rows(self, tokens: int, features: int, dtype: torch.dtype, piece: int, separate: bool = False) -> Rows:
        """An empty [tokens, features] matrix computed in `dtype`; `separate`: each piece freed as drained."""
        if self._folder is not None:
            folder = self._folder / str(next(self._serial))
            folder.mkdir()
            return DiskRows(tokens, features, dtype, piece, folder)
        kept = COMPACT.get(self.kind) if dtype.itemsize > 2 else None
        return MemoryRows(tokens, features, dtype, piece, self.device, kept, separate)

    def close(self) -> None:
        if self._folder is not None:
            shutil.rmtree(self._folder, ignore_errors=True)
            self._folder = None
