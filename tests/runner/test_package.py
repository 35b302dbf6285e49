"""The package surface: lazy top-level exports that keep light imports free of torch."""

import subprocess
import sys


def test_top_level_import_is_light_and_exports_resolve() -> None:
    code = (
        "import sys, modelpress\n"
        "assert 'torch' not in sys.modules, 'importing modelpress pulled in torch'\n"
        "from modelpress import oneshot, QuantizationModifier, GPTQModifier, SparseGPTModifier, load_recipe, ModelPressError\n"
        "assert 'torch' in sys.modules and callable(oneshot)\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_module_entry_point_reports_usage() -> None:
    done = subprocess.run([sys.executable, "-m", "modelpress.runner", "compress"], capture_output=True, text=True)
    assert done.returncode == 2 and "--model" in done.stderr
