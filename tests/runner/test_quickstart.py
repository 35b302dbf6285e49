"""examples/quickstart.yaml on the real SmolLM2-135M-Instruct, shortened (RTN, few tokens) to stay quick."""

import json
from pathlib import Path

import pytest
import yaml

from modelpress.runner.cli import main
from modelpress.runner.smollm2 import smollm2_dir
from modelpress.contract import parse_job

pytestmark = pytest.mark.quality
REPO = Path(__file__).resolve().parents[2]


def test_quickstart_compresses_smollm2_and_prints_answers(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> None:
    doc = yaml.safe_load((REPO / "examples" / "quickstart.yaml").read_text())
    job = parse_job(doc).spec
    assert (job.recipe.preset, job.recipe.algorithm, job.recipe.group_size) == ("W4A16", "GPTQ", 64)
    assert Path(job.model.uri).expanduser() == smollm2_dir()
    # shortened: RTN needs no calibration data, one prompt, a short evaluation text
    doc["spec"]["recipe"]["algorithm"] = "RTN"
    doc["spec"]["evaluation"]["prompts"] = doc["spec"]["evaluation"]["prompts"][:1]
    doc["spec"]["evaluation"]["maxNewTokens"] = 12
    doc["spec"]["evaluation"]["perplexity"]["maxTokens"] = 512
    doc["spec"]["output"]["uri"] = str(tmp_path / "out")
    (tmp_path / "job.yaml").write_text(yaml.safe_dump(doc))
    monkeypatch.chdir(REPO)
    code = main(["run", str(tmp_path / "job.yaml"), "--scratch", str(tmp_path / "s"), "--termination-log", str(tmp_path / "t"), "--format", "text"])
    out = capsys.readouterr().out
    assert code == 0
    result = json.loads((tmp_path / "t").read_text())
    assert result["sizes"]["ratio"] > 2.5
    metrics = result["metrics"]
    assert 5 < metrics["perplexityOriginal"] < 60 and 0 < metrics["perplexityIncreasePercent"] < 60
    assert "size before" in out and "ratio" in out and "> What is the capital of France?" in out
    first_answer = out.split("> What is the capital of France?")[1].strip().splitlines()[0]
    assert "Paris" in first_answer.split(" | ")[1]  # the compressed side of the two columns
    card = (tmp_path / "out" / "README.md").read_text()
    assert f"vllm serve {tmp_path / 'out'}" in card and "group_size: 64" in card


def test_the_gguf_conversion_shows_its_bars_only_when_asked(tmp_path: Path, capfd: pytest.CaptureFixture) -> None:
    assert (smollm2_dir(tmp_path / "quiet") / "model.safetensors").is_file()
    quiet = capfd.readouterr()
    assert "Converting" not in quiet.err and "Loading weights" not in quiet.err and quiet.out == ""
    # `progress` converts outside `_no_bars` (a second 20 s conversion is not needed to see that):
    # the same bar shows there, and after it transformers' bars are on again
    from transformers.utils import logging as hf_logging

    from modelpress.runner import smollm2

    def bar() -> None:
        for _ in hf_logging.tqdm(range(3), desc="Converting and de-quantizing GGUF tensors"):
            pass

    was_enabled = hf_logging.is_progress_bar_enabled()  # an earlier run in this process may have turned them off
    hf_logging.enable_progress_bar()
    try:
        with smollm2._no_bars():
            bar()
        assert "Converting" not in capfd.readouterr().err and hf_logging.is_progress_bar_enabled()
        bar()
        assert "Converting and de-quantizing GGUF tensors" in capfd.readouterr().err
    finally:
        if not was_enabled:
            hf_logging.disable_progress_bar()
