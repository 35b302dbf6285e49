"""`modelpress compress`: a summary on success, exit code 2 and one line on bad input."""

from pathlib import Path

import pytest

from support.models import make_model
from modelpress.runner.cli import main


def test_compress_prints_summary(llama_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert main(["compress", "--model", str(llama_dir), "--recipe", "W4A16", "--group-size", "64", "--output", str(tmp_path / "o")]) == 0
    out = capsys.readouterr().out
    assert "size before" in out and "size after" in out and "ratio" in out and "quantized Linears  14" in out
    assert '"group_size": 64' in (tmp_path / "o" / "config.json").read_text()


def test_compress_with_recipe_file(llama_dir: Path, tmp_path: Path) -> None:
    recipe = tmp_path / "r.yaml"
    recipe.write_text("quant_stage:\n  quant_modifiers:\n    QuantizationModifier: {scheme: FP8_DYNAMIC, ignore: [lm_head]}\n")
    assert main(["compress", "--model", str(llama_dir), "--recipe", str(recipe), "--output", str(tmp_path / "o")]) == 0
    assert "float-quantized" in (tmp_path / "o" / "config.json").read_text()


@pytest.mark.parametrize(
    ("case", "expected"),
    [
        ("missing-model", "model:"),
        ("unknown-scheme", "unknown preset 'W5A16X'"),
        ("indivisible", "does not divide"),
    ],
)
def test_bad_input_exits_2_with_one_line(
    case: str, expected: str, tmp_path: Path, tokenizer_dir: Path, llama_dir: Path, capsys: pytest.CaptureFixture
) -> None:
    model, recipe = str(llama_dir), "W4A16"
    if case == "missing-model":
        model = str(tmp_path / "nowhere")
    elif case == "unknown-scheme":
        recipe = "W5A16X"
    else:
        model = str(make_model("llama", tmp_path / "m", tokenizer_dir, hidden_size=96, intermediate_size=192, num_attention_heads=3, num_key_value_heads=1))
        capsys.readouterr()  # the fixture's own save messages
    assert main(["compress", "--model", model, "--recipe", recipe, "--output", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("modelpress: error: ") and expected in err
    assert not (tmp_path / "o").exists()
