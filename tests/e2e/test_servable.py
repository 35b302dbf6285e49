"""`spec.evaluation.servable` through `modelpress run` on a tiny model, with a stand-in for vLLM's
interpreter (support.fake_vllm): the served block and NLL reach the result, the termination message,
the operator's status.result and the model card; the gate fails, publishing nothing, when vLLM
refuses the output. tests/vllm/test_servable_job.py runs the same with real vLLM."""

import json
import math
from pathlib import Path
from typing import Any

import pytest
import yaml

from modelpress.contract import SERVED_NLL_BOUND, Env, ExitCode, FailureEvent, ResultEvent, StageEvent, parse_event
from modelpress.operator.status import observe, parse_result, status_patch
from modelpress.runner.cli import main
from support import fake_vllm
from support.models import CORPUS
from support.s3 import job_document, trained_llama  # noqa: F401 (fixture)

PROMPTS = ["Paris is", "The sea"]


def servable_job(trained: Path, tmp_path: Path, output: str) -> dict[str, Any]:
    text = tmp_path / "eval.txt"
    text.write_text(" ".join(CORPUS[:8]))
    return job_document(str(trained), str(tmp_path / output), recipe={"preset": "FP8_DYNAMIC", "algorithm": "RTN"},
                        evaluation={"perplexity": {"dataset": str(text), "maxTokens": 256}, "prompts": PROMPTS, "maxNewTokens": 3,
                                    "servable": True})


def run(tmp_path: Path, doc: dict[str, Any], capsys: pytest.CaptureFixture) -> tuple[int, Any, str]:
    """Exit code, the last stdout event, the termination message."""
    (tmp_path / "job.yaml").write_text(yaml.safe_dump(doc))
    term = tmp_path / "termination-log"
    code = main(["run", str(tmp_path / "job.yaml"), "--scratch", str(tmp_path / "scratch"), "--termination-log", str(term),
                 "--format", "json"])
    lines = capsys.readouterr().out.splitlines()
    assert "serve" in [e.stage for e in map(parse_event, lines) if isinstance(e, StageEvent)]
    return code, parse_event(lines[-1]), term.read_text()


def test_a_served_output_carries_vllms_answers_and_nll_to_status_and_card(
        trained_llama: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> None:  # noqa: F811
    monkeypatch.setenv(Env.VLLM_PYTHON, str(fake_vllm.interpreter(tmp_path / "bin")))
    code, result, term = run(tmp_path, servable_job(trained_llama, tmp_path, "out"), capsys)
    assert code == ExitCode.OK and isinstance(result, ResultEvent)
    served, nll = result.served, result.metrics.served_nll
    assert (served.served_by, served.loaded, served.kernels) == (f"vllm {fake_vllm.VERSION}", True, ["FakeLinearKernel"])
    assert [(a.prompt, a.answer) for a in served.answers] == [(p, f"fake answer to {p}") for p in PROMPTS]
    # the stand-in scores the plan's windows with the runner's own evaluation: the very tokens and NLL of transformers
    # (the perplexity is rounded to 4 decimals, which near 1 moves its log by up to 5e-5 / perplexity)
    ppl = result.metrics.perplexity_compressed
    assert nll.transformers == pytest.approx(math.log(ppl), abs=5e-5 / ppl + 1e-6)
    # both are reported to 5 decimals, so the same NLL computed twice can land one step apart
    assert nll.vllm == pytest.approx(nll.transformers, abs=1.01e-5) and nll.passed and nll.bound == SERVED_NLL_BOUND
    assert served.tokens > 0 and result.durations_s["serve"] > 0

    status = parse_result(term)
    assert status.served.served_by == served.served_by and [a.answer for a in status.served.answers] == [a.answer for a in served.answers]
    metrics = {m.name: m.value for m in status.metrics}
    assert (metrics["servedNll.vllm"], metrics["servedNll.transformers"], metrics["servedNll.bound"]) == (nll.vllm, nll.transformers, SERVED_NLL_BOUND)
    job = {"spec": {}, "status": {"conditions": [{"type": "Complete", "status": "True"}]}}
    pod = {"metadata": {"name": "p"}, "status": {"phase": "Succeeded", "containerStatuses": [
        {"name": "runner", "state": {"terminated": {"exitCode": 0, "message": term}}}]}}
    patch = status_patch({}, 1, observe(job, [pod], kueue=False), None)
    assert patch["result"]["served"]["servedBy"] == served.served_by

    card = (tmp_path / "out" / "README.md").read_text()
    assert f"Loaded by vllm {fake_vllm.VERSION} (compressed-tensors, FakeLinearKernel) before it was published" in card
    assert f"| {served.tokens} tokens | {nll.vllm:.4f} | {nll.transformers:.4f} | +0.00% (bound ±0.3%) |" in card
    assert "- vLLM: fake answer to Paris is" in card


def test_the_gate_fails_when_vllm_refuses_the_output(
        trained_llama: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> None:  # noqa: F811
    """An NLL off by more than the bound takes the same way out (tests/runner/test_served.py holds its message)."""
    monkeypatch.setenv(Env.VLLM_PYTHON, str(fake_vllm.interpreter(tmp_path / "bin", "refuse")))
    code, failure, term = run(tmp_path, servable_job(trained_llama, tmp_path, "gated"), capsys)
    assert code == ExitCode.QUALITY_GATE_FAILED and isinstance(failure, FailureEvent) and failure.reason == "QualityGateFailed"
    assert failure.message == (f"spec.evaluation.servable: vllm {fake_vllm.VERSION} could not load or run the output: "
                               f"{fake_vllm.REFUSAL}; nothing was published")
    assert not (tmp_path / "gated").exists()
    assert failure.served.loaded is False and failure.metrics.served_nll is None
    assert json.loads(term)["served"] == {"servedBy": f"vllm {fake_vllm.VERSION}", "loaded": False, "reason": fake_vllm.REFUSAL}
