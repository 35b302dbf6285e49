"""The report every peer driver writes beside its output, in the form compare_bench reads.

Imported by each driver under its own peer's interpreter, so it needs nothing but the standard
library and the torch every peer has.
"""

import json
from importlib.metadata import version
from pathlib import Path
from typing import Any


def write_report(path: Path, peer: str, packages: tuple[str, ...], started: float, imported: float, done: float,
                 **extra: Any) -> None:
    """Versions, torch's thread count, the import time (start to `imported`) and the time of the
    `oneshot` call alone (`imported` to `done`), then whatever the driver adds."""
    import torch

    report = {
        "peer": peer,
        "versions": {name: version(name) for name in packages},
        "threads": torch.get_num_threads(),
        "import_s": round(imported - started, 2),
        "oneshot_s": round(done - imported, 2),
        **extra,
    }
    path.write_text(json.dumps(report, indent=2) + "\n")
