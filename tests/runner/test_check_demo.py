"""CI's check of `make demo` (tests/check_demo.py): it passes a result whose compressed model answers, and nothing else."""

from pathlib import Path

import pytest

from check_demo import main
from modelpress.contract import Answer, FailureEvent, ResultEvent, Wire

FRANCE = "What is the capital of France?"


def lines(tmp_path: Path, *events: Wire) -> str:
    path = tmp_path / "demo.jsonl"
    path.write_text(".venv/bin/modelpress smollm2 >/dev/null\n" + "".join(e.to_json() + "\n" for e in events))
    return str(path)


def result(*answers: tuple[str, str]) -> ResultEvent:
    return ResultEvent(answers=[Answer(prompt=p, original="The capital of France is Paris.", compressed=c) for p, c in answers])


def test_a_compressed_model_that_still_answers_passes_and_its_summary_is_printed(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert main(lines(tmp_path, result((FRANCE, "Paris, of course."), ("Name a colour.", "Blue.")))) == 0
    out = capsys.readouterr().out
    assert f"> {FRANCE}" in out and "Paris, of course." in out


@pytest.mark.parametrize("events, why", [
    ((result((FRANCE, "Lyon.")),), "does not name Paris: 'Lyon.'"),
    ((result((FRANCE, "Paris."), ("Name a colour.", " ")),), "no answer to 'Name a colour.'"),
    ((result(("Name a colour.", "Blue.")),), "does not name Paris: None"),
    ((FailureEvent(reason="QualityGateFailed", exit_code=3, message="perplexity rose 80.0%"),), "the demo failed: perplexity rose 80.0%"),
    ((), "the demo wrote no result line"),
])
def test_anything_else_fails_and_says_why(events: tuple[Wire, ...], why: str, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert main(lines(tmp_path, *events)) == 1
    assert why in capsys.readouterr().err
