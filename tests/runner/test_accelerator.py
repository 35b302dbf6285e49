"""A pod given GPUs refuses a CPU-only torch before any work: exit 2, naming the image setting."""

import json
from pathlib import Path

import pytest
import torch
import yaml

from modelpress.contract import GPU_IMAGE_SETTING, Env, ExitCode
from modelpress.engine.errors import ModelPressError
from modelpress.runner.accelerator import require_gpu
from modelpress.runner.cli import main


@pytest.fixture()
def cpu_only_torch(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.version, "cuda", None)
    monkeypatch.setattr(torch.version, "hip", None)


def test_a_gpu_job_on_a_cpu_only_torch_names_the_setting_to_change(cpu_only_torch: None) -> None:
    with pytest.raises(ModelPressError) as err:
        require_gpu({Env.GPUS: "2"})
    assert str(err.value).startswith("spec.runtime.resources.gpus: the job asks for 2 GPU(s)")
    assert GPU_IMAGE_SETTING in str(err.value) and "spec.runtime.image" in str(err.value)


def test_a_cpu_job_or_a_visible_gpu_passes(cpu_only_torch: None, monkeypatch: pytest.MonkeyPatch) -> None:
    require_gpu({})
    require_gpu({Env.GPUS: "0"})
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    require_gpu({Env.GPUS: "1"})


def test_a_cuda_torch_that_sees_no_gpu_is_the_nodes_fault_and_retryable(cpu_only_torch: None, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.version, "cuda", "12.8")
    with pytest.raises(RuntimeError, match="sees none") as err:
        require_gpu({Env.GPUS: "1"})
    assert not isinstance(err.value, ModelPressError)


def test_the_runner_exits_2_before_any_work(cpu_only_torch: None, monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
                                            capsys: pytest.CaptureFixture) -> None:
    job = {"apiVersion": "modelpress.dev/v1alpha1", "kind": "CompressionJob", "metadata": {"name": "gpu"},
           "spec": {"model": {"uri": str(tmp_path / "no-model-here")}, "recipe": {"preset": "W8A8", "algorithm": "RTN"},
                    "output": {"uri": str(tmp_path / "out")}, "runtime": {"resources": {"gpus": 1}}}}
    (tmp_path / "job.yaml").write_text(yaml.safe_dump(job))
    monkeypatch.setenv(Env.GPUS, "1")
    log = tmp_path / "termination-log"
    code = main(["run", str(tmp_path / "job.yaml"), "--scratch", str(tmp_path / "scratch"), "--termination-log", str(log)])
    assert code == ExitCode.INVALID_INPUT
    assert GPU_IMAGE_SETTING in capsys.readouterr().err.strip().splitlines()[-1]
    failure = json.loads(log.read_text())
    assert failure["reason"] == "InvalidInput" and GPU_IMAGE_SETTING in failure["message"]
    assert not (tmp_path / "out").exists()
