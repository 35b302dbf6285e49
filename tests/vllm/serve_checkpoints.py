"""The vLLM driver as the tier runs it: `python tests/vllm/serve_checkpoints.py PLAN.json RESULTS.json`.

One definition: this runs the runner's own driver (modelpress/runner/vllm_driver.py, standard
library and vLLM only) with vLLM's interpreter, exactly as the runner's servable stage does.
"""

import runpy
from pathlib import Path

DRIVER = Path(__file__).resolve().parents[2] / "runner" / "src" / "modelpress" / "runner" / "vllm_driver.py"

if __name__ == "__main__":  # the engine's worker processes import this file again, and must not rerun it
    runpy.run_path(str(DRIVER), run_name="__main__")
