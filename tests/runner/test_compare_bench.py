"""bench/compare_bench.py, the side-by-side harness: what it measures and that both sides get the same inputs."""

import hashlib
import json
import sys
from pathlib import Path

import pytest

from support.models import CORPUS, REPO

sys.path.insert(0, str(REPO / "bench"))
import compare_bench  # noqa: E402
import held_out  # noqa: E402


def test_span_must_be_an_ordered_range_of_fractions() -> None:
    assert held_out.parse_span("0:0.5") == (0.0, 0.5)
    for bad in ("0.5", "0.6:0.5", "0:1.5", "a:b"):
        with pytest.raises(SystemExit, match="--span"):
            held_out.parse_span(bad)


def test_evaluation_span_that_overlaps_calibration_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    text = tmp_path / "text.txt"
    text.write_text("x")
    monkeypatch.setattr(sys, "argv", ["compare_bench.py", "--text", str(text), "--calibration-span", "0:0.6",
                                      "--evaluation-span", "0.5:1", "--json", str(tmp_path / "r.json")])
    with pytest.raises(SystemExit, match="--evaluation-span: overlaps"):
        compare_bench.main()


def test_measure_reports_the_childs_own_peak_and_time(tmp_path: Path) -> None:
    """A child that holds 200 MiB peaks above it; one that fails says why."""
    grow = compare_bench.measure([sys.executable, "-c", "b = bytearray(200 << 20); b[::4096] = b'x' * len(b[::4096])"],
                                 tmp_path / "grow")
    assert grow.exit_code == 0 and grow.error is None
    assert 200 <= grow.peak_rss_mib < 400
    assert grow.wall_s > 0 and grow.load >= 0
    fail = compare_bench.measure([sys.executable, "-c", "raise SystemExit('broken: the reason')"], tmp_path / "fail")
    assert fail.exit_code == 1 and fail.error == "broken: the reason"


def test_both_sides_read_the_same_windows(llama_dir: Path, tmp_path: Path) -> None:
    """Our own driver posing as the peer: the same windows file gives byte-identical checkpoints, and ratios of them."""
    text = tmp_path / "text.txt"
    text.write_text(" ".join(CORPUS), encoding="utf-8")
    windows = tmp_path / "windows.json"
    meta = held_out.write_windows(llama_dir, text, "0:0.5", 3, 32, windows)
    ids = json.loads(windows.read_text())["input_ids"]
    assert meta["num_samples"] == 3 and [len(w) for w in ids] == [32, 32, 32]

    twin = compare_bench.Peer("llmcompressor", "twin", Path(sys.executable), REPO / "bench" / "peers" / "modelpress_run.py")
    recipe = compare_bench.MATRIX[1]  # GPTQ W4A16 g64, which has a target
    settings = compare_bench.Settings(text, "0:0.5", "0.5:1", 3, 32, 0, 1, perplexity=False)
    case = compare_bench.compare_case("tiny", llama_dir, recipe, [twin], [windows], settings, tmp_path / "work")

    out = tmp_path / "work" / "tiny" / recipe.name
    digests = {side: [hashlib.sha256(f.read_bytes()).hexdigest() for f in sorted((out / side).glob("*.safetensors"))]
               for side in ("modelpress", "llmcompressor")}
    assert digests["modelpress"] and digests["modelpress"] == digests["llmcompressor"]
    for side in case["sides"].values():
        assert side["wall_s"] > 0 and side["peak_rss_mib"] > 100 and side["oneshot_s"] < side["wall_s"]
    assert set(case["ratios"]["llmcompressor"]) == {"wall", "cpu", "oneshot", "peak_rss", "perplexity"}
    assert case["target"]["wall"] == 0.4 and isinstance(case["target"]["met"], bool)
    report = {"machine": "m", "settings": {**settings.__dict__, "text": str(text)}, "models": {"tiny": {"float_perplexity": None}},
              "cases": [case]}
    row = compare_bench.markdown(report).splitlines()[-1]
    assert row.startswith("| tiny | GPTQ W4A16 g64 |") and "≤ 0.4×, ≤ 0.6×" in row


def test_draws_are_disjoint_window_sets_each_run_and_perplexity_is_their_mean(llama_dir: Path, tmp_path: Path,
                                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    text = tmp_path / "text.txt"
    text.write_text(" ".join(CORPUS), encoding="utf-8")
    single, both = tmp_path / "one" / "windows.json", tmp_path / "two" / "windows.json"
    single.parent.mkdir()
    both.parent.mkdir()
    held_out.write_windows(llama_dir, text, "0:0.5", 2, 16, single)
    held_out.write_windows(llama_dir, text, "0:0.5", 4, 16, both)
    assert compare_bench.split_draws(single, 2, 1) == [single]
    draws = compare_bench.split_draws(both, 2, 2)
    ids = [json.loads(d.read_text())["input_ids"] for d in draws]
    assert ids[0] == json.loads(single.read_text())["input_ids"]  # the first draw is the single draw's windows
    assert len(ids[1]) == 2 and not set(map(tuple, ids[0])) & set(map(tuple, ids[1]))

    measured = iter([30.0, 33.0])
    monkeypatch.setattr(compare_bench, "perplexity", lambda *_: next(measured))
    settings = compare_bench.Settings(text, "0:0.5", "0.5:1", 2, 16, 0, 1, perplexity=True, draws=2)
    case = compare_bench.compare_case("tiny", llama_dir, compare_bench.MATRIX[1], [], draws, settings, tmp_path / "work")
    out = tmp_path / "work" / "tiny" / compare_bench.MATRIX[1].name
    weights = [(out / f"draw-{d}" / "modelpress" / "model-00001-of-00001.safetensors").read_bytes() for d in (0, 1)]
    assert weights[0] != weights[1]  # each draw calibrated on its own windows
    ours = case["sides"]["modelpress"]
    assert ours["perplexities"] == [30.0, 33.0] and ours["perplexity"] == 31.5 and len(ours["runs"]) == 2


def test_markdown_has_columns_per_peer_and_says_where_a_peer_has_no_equivalent() -> None:
    def side(wall: float, ppl: float) -> dict:
        return compare_bench.summary([compare_bench.Run(wall, wall, 500.0, 0, 1.0)], ppl)

    cases = [{"model": "m", "label": "GAR", "sides": {"modelpress": side(10, 30.0), "gptqmodel": side(20, 32.0)},
              "ratios": {"gptqmodel": {"wall": 0.5, "peak_rss": 1.0, "perplexity": 0.938}}},
             {"model": "m", "label": "AWQ", "sides": {"modelpress": side(10, 30.0), "llmcompressor": side(40, 31.0)},
              "ratios": {"llmcompressor": {"wall": 0.25, "peak_rss": 1.0, "perplexity": 0.968}}}]
    settings = {"num_samples": 1, "max_seq_length": 2, "calibration_span": "0:0.5", "text": "t.txt",
                "evaluation_span": "0.5:1", "perplexity_tokens": 0, "repeats": 1}
    lines = compare_bench.markdown({"machine": "x", "settings": settings, "models": {}, "cases": cases}).splitlines()
    head, rule, gar, awq = lines[-4:]
    assert "GPTQModel 7.7" in head and "llm-compressor 0.14" in head
    assert head.count("|") == rule.count("|") == gar.count("|") == awq.count("|")
    assert "0.94×" in gar and "no equivalent" in gar and "0.97×" in awq and "no equivalent" in awq
