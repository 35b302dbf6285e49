"""The memory preflight: estimates from config.json alone, refusals that name settings which fit,
and the estimate in the first progress event, all before anything is downloaded."""

import json
import math
import re
from dataclasses import replace
from pathlib import Path

import pytest
import yaml

from modelpress.contract import ProgressEvent, parse_event
from modelpress.engine.errors import ModelPressError
from modelpress.runner import run as running
from modelpress.runner.cli import main
from modelpress.runner.memory import memory_limit
from modelpress.runner.preflight import LIBRARIES, SERVE_RUNTIME, TOKENIZER, NoShape, Shape, Work, _compress, estimate, verdict
from modelpress.runner.served import kv_cache_gib
from support.models import CORPUS
from support.s3 import connection_env, job_document, s3, s3_endpoint, upload_dir  # noqa: F401 (fixture)
from support.spills import spill_folders

MiB, GiB = 1 << 20, 1 << 30
RUNTIME = 400 * MiB
LLAMA_8B = {"model_type": "llama", "hidden_size": 4096, "intermediate_size": 14336, "num_attention_heads": 32,
            "num_key_value_heads": 8, "head_dim": 128, "vocab_size": 128256, "num_hidden_layers": 32,
            "tie_word_embeddings": False, "torch_dtype": "bfloat16"}
MIXTRAL = {"model_type": "mixtral", "hidden_size": 4096, "intermediate_size": 14336, "num_attention_heads": 32,
           "num_key_value_heads": 8, "vocab_size": 32000, "num_hidden_layers": 32, "num_local_experts": 8,
           "dtype": "bfloat16"}
GPTQ = Work(samples=512, sequence=2048, hessians=True)


def peak(shape: Shape, work: Work, name: str = "compress") -> int:
    return next(s.bytes for s in estimate(shape, work, RUNTIME) if s.name == name)


def test_the_shape_comes_from_config_json() -> None:
    shape = Shape.from_config(LLAMA_8B)
    assert (shape.q_width, shape.kv_width, shape.dtype_bytes) == (4096, 1024, 2)
    assert 8.0e9 < shape.total_params < 8.1e9  # Llama-3.1-8B has 8.03e9 parameters
    text = {k: v for k, v in LLAMA_8B.items() if k != "torch_dtype"}
    nested = Shape.from_config({"model_type": "gemma3", "text_config": text, "torch_dtype": "bfloat16"})
    assert nested.hidden == 4096 and nested.dtype_bytes == 2  # a multimodal wrapper's dtype, where its text model has none
    with pytest.raises(NoShape, match="config.json has no hidden_size"):
        Shape.from_config({"model_type": "llama", "num_hidden_layers": 2})


def test_the_estimate_grows_with_samples_and_sequence_length() -> None:
    shape = Shape.from_config(LLAMA_8B)
    by_samples = [peak(shape, replace(GPTQ, samples=n)) for n in (16, 64, 256, 1024)]
    by_length = [peak(shape, replace(GPTQ, sequence=n)) for n in (256, 1024, 2048, 4096)]
    assert by_samples == sorted(by_samples) and len(set(by_samples)) == 4
    assert by_length == sorted(by_length) and len(set(by_length)) == 4
    # 512 x 2048 tokens: the hidden states and a norm's output (8 GiB each in bfloat16), the MLP's inner activation (28 GiB)
    assert 44 * GiB < peak(shape, GPTQ) < 52 * GiB
    assert peak(shape, Work()) < peak(shape, replace(GPTQ, samples=1))  # no data: only weights and a Linear's temporaries


def test_tied_embeddings_mixture_of_experts_and_dtype_change_it_as_they_should() -> None:
    shape = Shape.from_config(LLAMA_8B)
    tied = Shape.from_config({**LLAMA_8B, "tie_word_embeddings": True})
    evaluation = Work(perplexity_tokens=512)
    assert peak(shape, evaluation, "perplexity") - peak(tied, evaluation, "perplexity") == 128256 * 4096 * 2  # one matrix fewer
    # compression holds the embeddings and head only outside the layers: by then nothing else is
    # there but heap holes as large as the widest Linear below glibc's mmap threshold (k_proj, float32)
    assert peak(shape, Work()) == RUNTIME + TOKENIZER + LIBRARIES + 4 * 16 * MiB + shape.outside_params * 2
    assert peak(tied, Work()) < peak(shape, Work())
    moe = Shape.from_config(MIXTRAL)
    dense = Shape.from_config({k: v for k, v in MIXTRAL.items() if k != "num_local_experts"})
    assert moe.layer_params > 7.5 * dense.mlp_params and 46e9 < moe.total_params < 47.5e9  # Mixtral-8x7B: 46.7e9
    small = replace(GPTQ, samples=8, sequence=512)
    # every expert's X^T X of a layer at once (generic path): 8 x (2 x 4096^2 + 14336^2) float32
    assert peak(moe, small) - peak(dense, small) > 8 * (2 * 4096**2 + 14336**2) * 4
    fp32 = Shape.from_config({**LLAMA_8B, "torch_dtype": "float32"})
    assert peak(fp32, evaluation, "perplexity") > peak(shape, evaluation, "perplexity") + shape.outside_params * 2


def test_evaluation_self_generation_and_answers_are_stages_of_their_own() -> None:
    shape = Shape.from_config(LLAMA_8B)
    work = replace(GPTQ, samples=64, sequence=512, self_generated=True, perplexity_tokens=8192, prompts=2, new_tokens=64)
    stages = {s.name: s.bytes for s in estimate(shape, work, RUNTIME)}
    assert list(stages) == ["runtime", "self-generation", "perplexity", "answers", "compress", "compressed perplexity",
                            "compressed answers"]
    whole = shape.total_params * 2
    assert whole < stages["self-generation"] - RUNTIME < whole * 1.35  # the whole float model, plus its KV cache
    assert stages["perplexity"] < stages["answers"] and stages["compressed perplexity"] < 4 * GiB  # one layer and windows
    assert stages["compressed answers"] > stages["answers"]  # the dequantizing loader's overhead
    assert stages["runtime"] == RUNTIME + TOKENIZER


def numbers(message: str) -> tuple[int, int, int, int]:
    found = re.search(r"numSamples (\d+) at maxSequenceLength (\d+) or maxSequenceLength (\d+) at numSamples (\d+) would fit", message)
    assert found, message
    return tuple(int(g) for g in found.groups())  # type: ignore[return-value]


@pytest.mark.parametrize("limit_gib", [16, 24, 40])
def test_a_refusal_names_the_largest_settings_that_fit_and_they_do(limit_gib: int) -> None:
    shape, limit = Shape.from_config(LLAMA_8B), limit_gib * GiB
    found = verdict(shape, GPTQ, RUNTIME, limit)
    assert found.problem is not None and found.problem.startswith("spec.calibration.numSamples: compression needs about ")
    samples, length, shorter, same = numbers(found.problem)
    assert (length, same) == (GPTQ.sequence, GPTQ.samples)
    base = RUNTIME + TOKENIZER + LIBRARIES
    assert _compress(shape, replace(GPTQ, samples=samples), base).bytes <= limit < _compress(shape, replace(GPTQ, samples=samples + 1), base).bytes
    assert _compress(shape, replace(GPTQ, sequence=shorter), base).bytes <= limit < _compress(shape, replace(GPTQ, sequence=shorter + 1), base).bytes
    assert verdict(shape, replace(GPTQ, samples=samples), RUNTIME, limit).problem is None
    assert found.estimate.peak_stage == "compress" and found.estimate.limit_bytes == limit


def test_what_cannot_be_helped_by_fewer_samples_says_so() -> None:
    shape = Shape.from_config(LLAMA_8B)
    assert verdict(shape, GPTQ, RUNTIME, 256 * MiB).problem.startswith("memory limit: the runtime alone needs about 448.0 MiB")
    problem = verdict(shape, Work(), RUNTIME, 2 * GiB).problem
    assert problem.startswith("memory limit: compression needs about ") and problem.endswith("give the job more memory")
    selfgen = verdict(shape, replace(GPTQ, samples=16, sequence=512, self_generated=True), RUNTIME, 12 * GiB).problem
    assert selfgen.startswith("spec.calibration.dataset: self-generated calibration loads the whole model and needs about 1")
    assert selfgen.endswith("give a calibration dataset instead")  # the compression itself fits
    ppl = verdict(shape, Work(perplexity_tokens=1_000_000), RUNTIME, 12 * GiB).problem
    tokens = int(re.search(r"maxTokens (\d+) would fit", ppl).group(1))
    assert ppl.startswith("spec.evaluation.perplexity.maxTokens: perplexity needs about ") and 64 <= tokens < 1_000_000


def test_answers_that_would_not_fit_are_skipped_not_refused() -> None:
    shape = Shape.from_config(LLAMA_8B)  # 16 GB of bfloat16: whole, it does not fit in 12 GiB, one layer at a time it does
    found = verdict(shape, Work(perplexity_tokens=4096, prompts=1, new_tokens=16), RUNTIME, 12 * GiB)
    assert found.problem is None and found.answers_skipped == (
        "answers need the whole model in memory, about 20.0 GiB in all, more than the 12.0 GiB this job may use")
    assert {s.stage for s in found.estimate.stages if s.skipped} == {"answers", "compressed answers"}
    assert found.estimate.peak_bytes <= 12 * GiB and found.estimate.peak_stage not in ("answers", "compressed answers")


def test_the_servable_check_is_a_stage_with_vllms_kv_cache_and_refuses_with_the_fix() -> None:
    shape = Shape.from_config({**LLAMA_8B, "num_hidden_layers": 2, "vocab_size": 32000})  # about 1.2 GB of bfloat16
    work = replace(GPTQ, samples=16, sequence=256, perplexity_tokens=512)
    assert "servable" not in {s.name for s in estimate(shape, work, RUNTIME)}
    served = replace(work, served_kv_cache=4 * GiB)
    stages = {s.name: s.bytes for s in estimate(shape, served, RUNTIME)}
    assert list(stages)[-1] == "servable"
    assert stages["servable"] == RUNTIME + TOKENIZER + LIBRARIES + SERVE_RUNTIME + 4 * GiB + shape.total_params * 2
    others = max(b for n, b in stages.items() if n != "servable")
    assert stages["servable"] > others  # here the check, not compression, is the job's peak
    limit = (others + stages["servable"]) // 2
    assert verdict(shape, work, RUNTIME, limit).problem is None
    found = verdict(shape, served, RUNTIME, limit)
    assert found.estimate.peak_stage == "servable" and found.problem.startswith("spec.evaluation.servable: vLLM's check needs about ")
    assert "lower VLLM_CPU_KVCACHE_SPACE" in found.problem and found.problem.endswith("or set servable: false")
    on_gpu = {s.name: s.bytes for s in estimate(shape, replace(served, on_host=False), RUNTIME)}
    assert on_gpu["servable"] == RUNTIME + TOKENIZER + LIBRARIES + SERVE_RUNTIME  # weights and cache on the accelerator
    assert kv_cache_gib({}) == 2.0 and kv_cache_gib({"VLLM_CPU_KVCACHE_SPACE": "0.5"}) == 0.5
    for bad in ("two", "0", "-1", "nan"):
        with pytest.raises(ModelPressError, match="VLLM_CPU_KVCACHE_SPACE: .* is not a positive number of GiB; set it like"):
            kv_cache_gib({"VLLM_CPU_KVCACHE_SPACE": bad})


def test_auto_keeps_activations_in_the_first_storage_that_fits() -> None:
    fp32 = Shape.from_config({**LLAMA_8B, "torch_dtype": "float32"})
    size = {k: peak(fp32, replace(GPTQ, activations=k)) for k in ("memory", "bfloat16", "disk")}
    # the hidden states, a norm's output and the MLP's inner activation: 36 GiB in bfloat16, 72 in float32, none spilled
    assert size["memory"] - size["bfloat16"] > 30 * GiB and size["bfloat16"] - size["disk"] > 30 * GiB
    auto = replace(GPTQ, activations="auto")
    for limit, picked in [(None, "memory"), (size["memory"], "memory"), (size["bfloat16"], "bfloat16"), (size["disk"], "disk")]:
        found = verdict(fp32, auto, RUNTIME, limit)
        assert (found.activations, found.problem, found.estimate.activation_storage) == (picked, None, picked)
    short = verdict(fp32, auto, RUNTIME, size["disk"] - 1)
    assert short.activations == "disk" and short.problem.endswith("would fit (activationStorage disk)")
    bf16 = Shape.from_config(LLAMA_8B)  # a bfloat16 model keeps bfloat16 activations already: 16 bits halve nothing
    assert verdict(bf16, auto, RUNTIME, peak(bf16, GPTQ) - 1).activations == "disk"
    assert verdict(bf16, replace(auto, on_host=False), RUNTIME, None).activations == "memory"
    asked = verdict(fp32, GPTQ, RUNTIME, size["bfloat16"]).problem
    assert "memory limit; activationStorage bfloat16 or numSamples " in asked  # memory asked for, 16 bits offered
    assert verdict(fp32, replace(GPTQ, activations="disk"), RUNTIME, size["disk"]).problem is None
    assert verdict(fp32, Work(), RUNTIME, None).estimate.activation_storage is None  # no data: no activations kept


def run_job(tmp_path: Path, doc: dict, *extra: str) -> tuple[int, dict]:
    (tmp_path / "job.yaml").write_text(yaml.safe_dump(doc))
    term = tmp_path / "termination-log"
    code = main(["run", str(tmp_path / "job.yaml"), "--scratch", str(tmp_path / "scratch"), "--termination-log", str(term), *extra])
    return code, json.loads(term.read_text())


def test_a_job_that_would_not_fit_is_refused_before_anything_is_downloaded(
    s3_endpoint: str, llama_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture  # noqa: F811
) -> None:
    upload_dir(s3(s3_endpoint), "big", "models/tiny", llama_dir)
    connection_env(monkeypatch, s3_endpoint, "model", "output")
    monkeypatch.setattr(running, "resident_bytes", lambda: RUNTIME)
    doc = job_document("s3://big/models/tiny", str(tmp_path / "out"), recipe={"preset": "W4A16", "algorithm": "GPTQ"},
                       calibration={"dataset": str(tmp_path / "calib.jsonl"), "numSamples": 50_000, "maxSequenceLength": 4096})
    code, term = run_job(tmp_path, doc, "--format", "json", "--memory-limit", "4Gi")
    out, err = capsys.readouterr()
    lines = err.strip().splitlines()
    assert code == 2 and term["reason"] == "InvalidInput" and len(lines) == 1
    assert lines[0].startswith("modelpress: error: spec.calibration.numSamples: compression needs about ")
    samples, length, shorter, same = numbers(lines[0])
    assert (length, same) == (4096, 50_000) and 0 < samples < 50_000 and 0 < shorter < 4096
    first = parse_event(out.splitlines()[0])
    assert isinstance(first, ProgressEvent) and first.stage == "preflight" and first.memory.limit_bytes == 4 * GiB
    assert first.memory.peak_stage == "compress" and first.memory.peak_bytes > 4 * GiB
    assert not (tmp_path / "scratch").exists()  # nothing was fetched: the model's config.json was read alone
    shape = Shape.from_config(json.loads((llama_dir / "config.json").read_text()))
    assert lines[0].endswith("would fit (activationStorage disk)") and first.memory.activation_storage == "disk"
    work = Work(samples=samples, sequence=4096, hessians=True, activations="disk")  # auto's most frugal storage
    assert verdict(shape, work, RUNTIME, 4 * GiB).problem is None  # what the message offers does fit


def test_without_memory_limit_the_cgroup_limit_applies(llama_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                      capsys: pytest.CaptureFixture) -> None:
    cgroup = tmp_path / "memory.max"
    cgroup.write_text(f"{300 * MiB}\n")
    monkeypatch.setattr(running, "memory_limit", lambda: memory_limit(cgroup, tmp_path / "none", tmp_path / "none"))
    monkeypatch.setattr(running, "resident_bytes", lambda: RUNTIME)
    code, term = run_job(tmp_path, job_document(str(llama_dir), str(tmp_path / "out")), "--format", "json")
    out, err = capsys.readouterr()
    assert code == 2 and err.strip().splitlines()[-1] == (
        "modelpress: error: memory limit: the runtime alone needs about 448.0 MiB at its peak (Python, torch, transformers and "
        "the tokenizer), more than the 300.0 MiB memory limit; give the job more memory")
    assert json.loads(out.splitlines()[0])["memory"]["limitBytes"] == 300 * MiB
    assert not (tmp_path / "out").exists()


def test_the_estimate_is_the_first_progress_event_and_a_line_per_stage_for_people(
        llama_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> None:
    text = tmp_path / "eval.txt"
    text.write_text("The quick brown fox jumps over the lazy dog. " * 40)
    doc = job_document(str(llama_dir), str(tmp_path / "out"), evaluation={"perplexity": {"dataset": str(text), "maxTokens": 128}})
    code, _ = run_job(tmp_path, doc, "--format", "json", "--memory-limit", "64Gi")
    events = [parse_event(line) for line in capsys.readouterr().out.splitlines()]
    progress = [e for e in events if isinstance(e, ProgressEvent)]
    assert code == 0 and progress[0].memory is not None and all(e.memory is None for e in progress[1:])
    assert [s.stage for s in progress[0].memory.stages] == ["runtime", "perplexity", "compress", "compressed perplexity"]
    assert progress[0].memory.limit_bytes == 64 * GiB

    doc["spec"]["output"]["overwrite"] = True
    code, _ = run_job(tmp_path, doc, "--format", "text", "--memory-limit", "64Gi")
    err = capsys.readouterr().err.splitlines()
    start = next(i for i, line in enumerate(err) if line.startswith("memory estimate: peak "))
    assert code == 0 and err[start].endswith(", limit 64.0 GiB)")
    assert [line.split()[0] for line in err[start + 1 : start + 5]] == ["runtime", "perplexity", "compress", "compressed"]


def test_a_job_spills_its_activations_inside_its_scratch_folder_when_the_spec_says_so(
        llama_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> None:
    seen = spill_folders(monkeypatch)
    calib = tmp_path / "calib.txt"
    calib.write_text(" ".join(CORPUS))
    doc = job_document(str(llama_dir), str(tmp_path / "out"), recipe={"preset": "W4A16", "algorithm": "GPTQ"},
                       calibration={"dataset": str(calib), "numSamples": 4, "maxSequenceLength": 32, "activationStorage": "disk"})
    code, _ = run_job(tmp_path, doc, "--format", "json")
    first = parse_event(capsys.readouterr().out.splitlines()[0])
    assert code == 0 and first.memory.activation_storage == "disk"
    assert seen and all(f.resolve().is_relative_to((tmp_path / "scratch").resolve()) for f in seen)
    assert not [p for p in (tmp_path / "scratch").rglob("*") if p.is_file()]


def test_a_memory_limit_that_is_not_a_quantity_exits_2(llama_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    code, term = run_job(tmp_path, job_document(str(llama_dir), str(tmp_path / "out")), "--memory-limit", "lots")
    assert code == 2 and term["message"] == "--memory-limit: 'lots' is not a quantity of bytes; write it like 8Gi or 512Mi"


def test_the_synthetic_model_is_written_shard_by_shard_and_reads_back(tmp_path: Path, tokenizer_dir: Path) -> None:
    import torch

    from modelpress.engine.weights import SafetensorsSource, check_model_dir
    from support.synthetic import llama_config, write_synthetic_llama

    config = llama_config(hidden=64, intermediate=128, layers=3, heads=4, kv_heads=2, vocab=320, dtype=torch.bfloat16)
    out = write_synthetic_llama(tmp_path / "synthetic", config, tokenizer_dir, shard_bytes=64 << 10)
    check_model_dir(out)
    source = SafetensorsSource(out)
    assert len(source.files) > 3 and source.get("model.layers.2.mlp.down_proj.weight").shape == (64, 128)
    shape = Shape.from_config(json.loads((out / "config.json").read_text()))
    assert shape.total_params * 2 == sum(math.prod(e[2]) * 2 for e in source.entries.values() if not e[2] == [64])  # weights, norms aside


def test_a_float_target_recipe_counts_its_float_stream() -> None:
    from modelpress.contract import JobSpec
    from modelpress.engine.gptq import GPTQModifier
    from modelpress.runner.preflight import job_work

    shape = Shape.from_config(LLAMA_8B)
    floats = replace(GPTQ, float_stream=True)
    # every kept activation twice (8B, 512 x 2048 tokens: 44-52 GiB of them in one stream) but the MLP
    # norm output of one stream at a time, and one more layer
    assert 1.7 * peak(shape, GPTQ) < peak(shape, floats) < 2.0 * peak(shape, GPTQ)
    assert peak(shape, replace(floats, activations="disk")) < peak(shape, GPTQ)  # spilled, both streams stay on disk
    spec = JobSpec.model_validate({"model": {"uri": "hf://a/b"}, "output": {"uri": "s3://bucket/out"}, "recipe": {"preset": "W4A16"},
                                 "calibration": {"dataset": "self-generated"}})
    assert job_work(spec, [GPTQModifier(scheme="W4A16", float_target=0.5)], True).float_stream
    assert not job_work(spec, [GPTQModifier(scheme="W4A16")], True).float_stream
