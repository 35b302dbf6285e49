"""A GPTQ job SIGKILLed at random layers: the rerun continues at the first unfinished layer and writes the same bytes."""

import hashlib
import json
import random
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from modelpress.runner.cli import main
from support.models import CORPUS, make_model
from support.s3 import job_document

LAYERS, SOLVES_PER_LAYER = 6, 4  # GPTQ solves q/k/v, o, gate/up and down of each layer
KILLER = Path(__file__).parents[1] / "support" / "killed_run.py"


@pytest.fixture(scope="module")
def job(tmp_path_factory: pytest.TempPathFactory, tokenizer_dir: Path) -> dict:
    root = tmp_path_factory.mktemp("killed")
    model = make_model("llama", root / "model", tokenizer_dir, num_hidden_layers=LAYERS)
    (root / "calib.txt").write_text("\n".join(CORPUS))
    return job_document(str(model), "out", recipe={"preset": "W4A16", "algorithm": "GPTQ"},
                        calibration={"dataset": str(root / "calib.txt"), "numSamples": 8, "maxSequenceLength": 32})


def run_args(tmp_path: Path, job: dict, name: str) -> list[str]:
    doc = json.loads(json.dumps(job))
    doc["spec"]["output"]["uri"] = str(tmp_path / name)
    (tmp_path / f"{name}.yaml").write_text(yaml.safe_dump(doc))
    return ["run", str(tmp_path / f"{name}.yaml"), "--scratch", str(tmp_path / "scratch"), "--format", "json",
            "--termination-log", str(tmp_path / f"{name}.term")]


def shards(out: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(out.glob("*.safetensors"))}


def progress(stdout: str) -> list[dict]:
    return [e for e in map(json.loads, filter(None, stdout.splitlines())) if e.get("event") == "progress" and e["stage"] == "compress"]


def stages(stdout: str) -> list[str]:
    return [e["stage"] for e in map(json.loads, filter(None, stdout.splitlines())) if e.get("event") == "stage"]


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_a_killed_job_resumes_at_its_first_unfinished_layer(tmp_path: Path, job: dict, seed: int,
                                                            capsys: pytest.CaptureFixture) -> None:
    cut = random.Random(seed).randrange(SOLVES_PER_LAYER + 1, LAYERS * SOLVES_PER_LAYER)  # past layer 1, before the end
    killed = subprocess.run([sys.executable, str(KILLER), str(cut), *run_args(tmp_path, job, "out")],
                            capture_output=True, text=True, timeout=600)
    assert killed.returncode == -9, killed.stderr[-2000:]
    finished = (cut - 1) // SOLVES_PER_LAYER  # layers done before the solve that was cut
    assert not (tmp_path / "out" / "modelpress-manifest.json").exists()

    capsys.readouterr()
    assert main(run_args(tmp_path, job, "out")) == 0
    out = capsys.readouterr().out
    resumed = progress(out)
    assert resumed[0]["resumedAt"] == finished and resumed[0]["layer"] == finished + 1  # nothing finished is redone
    assert stages(out) == ["fetch", "compress", "publish"]  # the calibration samples were kept too

    assert main(["run", *run_args(tmp_path, job, "whole")[1:2], "--scratch", str(tmp_path / "fresh"), "--format", "json",
                 "--termination-log", str(tmp_path / "whole.term")]) == 0
    whole = progress(capsys.readouterr().out)
    assert "resumedAt" not in whole[0] and whole[0]["layer"] == 1
    assert shards(tmp_path / "out") == shards(tmp_path / "whole") and shards(tmp_path / "out")
