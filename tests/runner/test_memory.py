"""The memory a job may use, and what the runner leaves out when a model would not fit in it."""

import json
from pathlib import Path

import pytest
import yaml

from modelpress.contract import human_bytes
from modelpress.runner import run as running
from modelpress.runner.cli import main
from modelpress.runner.memory import memory_limit, resident_bytes
from modelpress.runner.preflight import Shape, Work, estimate
from support.models import CORPUS, make_model
from support.s3 import job_document


def test_memory_limit_reads_the_cgroup_then_the_machine(tmp_path: Path) -> None:
    v2, v1, meminfo = tmp_path / "memory.max", tmp_path / "limit_in_bytes", tmp_path / "meminfo"
    meminfo.write_text("MemTotal:       16384 kB\nMemFree: 1 kB\n")
    assert memory_limit(v2, v1, meminfo) == 16384 * 1024
    v2.write_text("max\n")  # a cgroup without a limit
    v1.write_text("9223372036854771712\n")
    assert memory_limit(v2, v1, meminfo) == 16384 * 1024
    v1.write_text("2147483648\n")
    assert memory_limit(v2, v1, meminfo) == 2 << 30
    v2.write_text("1073741824\n")
    assert memory_limit(v2, v1, meminfo) == 1 << 30
    assert memory_limit(tmp_path / "a", tmp_path / "b", tmp_path / "c") is None


def test_resident_bytes_reads_this_process(tmp_path: Path) -> None:
    status = tmp_path / "status"
    status.write_text("Name:\tpython\nVmHWM:\t  900 kB\nVmRSS:\t  512 kB\n")
    assert resident_bytes(status) == 512 * 1024
    assert resident_bytes(tmp_path / "none") > 1 << 20  # the peak so far, where /proc says nothing


def test_answers_are_skipped_with_a_reason_when_the_model_would_not_fit(
    tmp_path: Path, tokenizer_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # many thin layers: the whole model is far bigger than one layer, which is all the other stages hold
    model = make_model("llama", tmp_path / "deep", tokenizer_dir, num_hidden_layers=24, hidden_size=256, intermediate_size=1024)
    text = tmp_path / "eval.txt"
    text.write_text(" ".join(CORPUS))
    doc = job_document(str(model), str(tmp_path / "out"),
                       evaluation={"perplexity": {"dataset": str(text), "maxTokens": 128}, "prompts": ["Hello?"]})
    (tmp_path / "job.yaml").write_text(yaml.safe_dump(doc))
    runtime = 400 << 20
    stages = {s.name: s.bytes for s in estimate(Shape.from_config(json.loads((model / "config.json").read_text())),
                                                 Work(perplexity_tokens=128, prompts=1, new_tokens=64), runtime)}
    limit = max(b for name, b in stages.items() if "answers" not in name) + (8 << 20)
    assert stages["answers"] > limit and stages["compressed answers"] > limit
    monkeypatch.setattr(running, "resident_bytes", lambda: runtime)
    monkeypatch.setattr(running, "memory_limit", lambda: limit)  # the pod's cgroup limit
    term = tmp_path / "term"
    assert main(["run", str(tmp_path / "job.yaml"), "--scratch", str(tmp_path / "s"), "--termination-log", str(term),
                 "--format", "json"]) == 0
    result = json.loads(term.read_text())
    assert result["metrics"]["perplexityOriginal"] > 0 and result["metrics"]["perplexityCompressed"] > 0  # streamed: still measured
    assert "answers" not in result or not result["answers"]
    assert result["answersSkipped"] == (f"answers need the whole model in memory, about {human_bytes(stages['compressed answers'])} "
                                        f"in all, more than the {human_bytes(limit)} this job may use")
