"""Watch where activations are spilled to disk."""

from pathlib import Path

import pytest

from modelpress.engine.activations import DiskRows


def spill_folders(monkeypatch: pytest.MonkeyPatch) -> list[Path]:
    """The folder of every DiskRows made from now on, in the order they were made."""
    seen: list[Path] = []
    made = DiskRows.__init__

    def record(self: DiskRows, *args, **kwargs) -> None:
        made(self, *args, **kwargs)
        seen.append(self.folder)

    monkeypatch.setattr(DiskRows, "__init__", record)
    return seen
