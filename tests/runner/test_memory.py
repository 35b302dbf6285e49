"""The memory a job may use, and what the runner leaves out when a model would not fit in it."""

import json
from pathlib import Path

import pytest
import yaml

from modelpress.runner import run as running
from modelpress.runner.cli import main
from modelpress.runner.memory import memory_limit
from support.models import CORPUS
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


def test_answers_are_skipped_with_a_reason_when_the_model_would_not_fit(
    llama_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    text = tmp_path / "eval.txt"
    text.write_text(" ".join(CORPUS))
    doc = job_document(str(llama_dir), str(tmp_path / "out"),
                       evaluation={"perplexity": {"dataset": str(text), "maxTokens": 128}, "prompts": ["Hello?"]})
    (tmp_path / "job.yaml").write_text(yaml.safe_dump(doc))
    monkeypatch.setattr(running, "memory_limit", lambda: 1 << 20)  # a 1 MiB pod: the tiny model's float weights do not fit
    term = tmp_path / "term"
    assert main(["run", str(tmp_path / "job.yaml"), "--scratch", str(tmp_path / "s"), "--termination-log", str(term),
                 "--format", "json"]) == 0
    result = json.loads(term.read_text())
    assert result["metrics"]["perplexityOriginal"] > 0 and result["metrics"]["perplexityCompressed"] > 0  # streamed: still measured
    assert "answers" not in result or not result["answers"]
    assert result["answersSkipped"].startswith("answers need the whole model in memory, and its ")
    assert "more than half the 1.0 MiB this job may use" in result["answersSkipped"]
