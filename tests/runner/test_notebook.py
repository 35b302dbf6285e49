"""examples/quickstart.ipynb, run headless (nbclient) on the real SmolLM2-135M-Instruct, offline and quick.

The parameters cell is overridden the way papermill does it (a cell right after it): SmolLM2 from
`modelpress smollm2`, groups of 64, a few calibration windows of the shipped WikiText-2 excerpt, two
questions. GPTQ's column sweep costs the same however few the samples, so CI quantizes the MLP's
gate/up projections only (a sixth of the columns) to stay near a minute. No cluster is reachable, so
the CompressionJob cells must build and check the job and then skip the submission cleanly.
"""

import json
import re
import time
from pathlib import Path
from typing import Any

import nbformat
import pytest
import yaml
from nbclient import NotebookClient

from modelpress.contract import parse_job
from modelpress.runner.smollm2 import smollm2_dir

pytestmark = pytest.mark.quality
REPO = Path(__file__).resolve().parents[2]
NOTEBOOK = REPO / "examples" / "quickstart.ipynb"
QUESTIONS = ["What is the capital of France?", "Explain in one sentence what a CPU does."]
TARGETS = [r"re:.*mlp\.(gate|up)_proj$"]


def text_of(cell: Any) -> str:
    """Everything a cell printed or displayed, as text."""
    parts = []
    for output in cell.get("outputs", []):
        if output["output_type"] == "stream":
            parts.append(output["text"])
        elif output["output_type"] in ("display_data", "execute_result"):
            parts.append(output["data"].get("text/markdown") or output["data"].get("text/plain", ""))
    return "".join(parts)


def overrides(out: Path) -> str:
    scheme = {"weights": {"num_bits": 4, "type": "int", "symmetric": True, "strategy": "group", "group_size": 64}}
    values = {
        "MODEL": str(smollm2_dir()), "SCHEME": scheme, "TARGETS": TARGETS,
        "DATASET": str(REPO / "tests" / "data" / "wikitext-2" / "calibration.txt"),
        "NUM_CALIBRATION_SAMPLES": 8, "MAX_SEQ_LENGTH": 128, "OUTPUT_DIR": str(out),
        "QUESTIONS": QUESTIONS, "MAX_NEW_TOKENS": 16, "CLUSTER_MODEL_URI": "hf://HuggingFaceTB/SmolLM2-135M-Instruct",
        "WATCH_TIMEOUT_S": 5, "WATCH_INTERVAL_S": 1,
    }
    return "\n".join(f"{name} = {value!r}" for name, value in values.items())


@pytest.fixture(scope="module")
def executed(tmp_path_factory: pytest.TempPathFactory) -> tuple[Any, Path, float]:
    tmp = tmp_path_factory.mktemp("notebook")
    out = tmp / "model-w4a16"
    nb = nbformat.read(NOTEBOOK, as_version=4)
    (index,) = [i for i, c in enumerate(nb.cells) if "parameters" in c.metadata.get("tags", [])]
    nb.cells.insert(index + 1, nbformat.v4.new_code_cell(overrides(out), metadata={"tags": ["injected-parameters"]}))
    with pytest.MonkeyPatch.context() as env:
        env.setenv("KUBECONFIG", str(tmp / "no-kubeconfig"))  # no cluster: nothing to load, nothing in-cluster
        env.delenv("KUBERNETES_SERVICE_HOST", raising=False)
        env.setenv("HF_HUB_OFFLINE", "1")
        start = time.monotonic()
        NotebookClient(nb, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(tmp)}}).execute()
        seconds = time.monotonic() - start
    return nb, out, seconds


def cell_with(nb: Any, code: str) -> Any:
    (found,) = [c for c in nb.cells if c.cell_type == "code" and code in c.source]
    return found


def test_runs_to_the_end_without_errors(executed: tuple[Any, Path, float]) -> None:
    nb, _, seconds = executed
    errors = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", []) if o["output_type"] == "error"]
    assert errors == []
    assert all(c.get("execution_count") for c in nb.cells if c.cell_type == "code")
    print(f"notebook ran in {seconds:.0f} s")


def test_sizes_are_measured_on_disk(executed: tuple[Any, Path, float]) -> None:
    nb, out, _ = executed
    printed = text_of(cell_with(nb, "sizes = {"))
    sizes = {name: int(n) for name, n in re.findall(r"(original|compressed):.*\((\d+) bytes\)", printed)}
    on_disk = sum(p.stat().st_size for p in out.glob("*.safetensors"))
    assert sizes["compressed"] == on_disk and sizes["original"] == sum(p.stat().st_size for p in smollm2_dir().glob("*.safetensors"))
    ratio = float(re.search(r"ratio: ([\d.]+)x smaller", printed).group(1))
    # int4 gate/up (two fifths of SmolLM2's weights) and everything else in float32
    assert ratio == pytest.approx(sizes["original"] / sizes["compressed"], abs=0.01) and 1.3 < ratio < 2.5
    assert {"config.json", "recipe.yaml", "tokenizer.json"} <= set(p.name for p in out.iterdir())
    config = json.loads((out / "config.json").read_text())["quantization_config"]
    weights = next(iter(config["config_groups"].values()))["weights"]
    assert (weights["num_bits"], weights["group_size"]) == (4, 64) and "lm_head" in config["ignore"]


def test_answers_are_side_by_side(executed: tuple[Any, Path, float]) -> None:
    nb, _, _ = executed
    cell = cell_with(nb, "answers = [")
    printed = text_of(cell)
    table = next(o["data"]["text/markdown"] for o in cell.outputs if o["output_type"] == "display_data")
    assert table.startswith("| question | original | compressed |")
    for question in QUESTIONS:
        block = printed.split(f"> {question}\n", 1)[1]
        original = re.search(r"original: +(.+)", block).group(1)
        compressed = re.search(r"compressed: +(.+)", block).group(1)
        assert original.strip() and compressed.strip()
        assert f"| {question} |" in table
    france = printed.split(f"> {QUESTIONS[0]}\n", 1)[1].split("\n>", 1)[0]
    assert "Paris" in france


def test_the_same_compression_as_a_compressionjob_is_built_then_skipped(executed: tuple[Any, Path, float]) -> None:
    nb, _, _ = executed
    manifest = yaml.safe_load(text_of(cell_with(nb, "job_manifest = {")))
    job = parse_job(manifest).spec
    gptq = manifest["spec"]["recipe"]["modifiers"]["quant_stage"]["quant_modifiers"]["GPTQModifier"]
    assert gptq["scheme"]["weights"]["group_size"] == 64 and gptq["ignore"] == ["lm_head"] and gptq["targets"] == TARGETS
    assert job.model.uri == "hf://HuggingFaceTB/SmolLM2-135M-Instruct" and job.calibration.dataset == "self-generated"
    assert job.evaluation.prompts == QUESTIONS and job.output.connection == "models-s3"
    assert "No Kubernetes cluster reachable" in text_of(cell_with(nb, "config.load_incluster_config()"))
    assert text_of(cell_with(nb, "create_namespaced_custom_object")) == ""
    assert text_of(cell_with(nb, "def describe")) == ""
