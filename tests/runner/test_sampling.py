"""The self-generation sampler: which tokens it may draw, seeds, end-of-sequence tokens, the KV cache, progress."""

import io
import json
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from modelpress.runner import sampling
from modelpress.runner.progress import Reporter
from modelpress.runner.sampling import Rate, generate, next_tokens

EOS = 2


def drawn(logits: list[float], rows: int = 4000, seed: int = 0, **cut: float) -> torch.Tensor:
    """Token ids drawn for `rows` copies of one row of logits."""
    return next_tokens(torch.tensor([logits]).repeat(rows, 1), torch.Generator().manual_seed(seed), **cut)


def test_top_k_draws_only_the_shortlist_and_all_of_it() -> None:
    logits = [0.0, 3.0, -1.0, 2.9, 2.8, 0.5]
    assert set(drawn(logits, top_k=3, top_p=1.0).tolist()) == {1, 3, 4}


def test_top_p_keeps_the_fewest_tokens_reaching_the_mass_and_always_the_likeliest() -> None:
    logits = torch.tensor([0.5, 0.3, 0.15, 0.05]).log().tolist()
    assert set(drawn(logits, top_k=4, top_p=0.8).tolist()) == {0, 1}  # 0.5 + 0.3 reach 0.8: token 2 is cut
    assert set(drawn(logits, top_k=4, top_p=0.81).tolist()) == {0, 1, 2}
    assert set(drawn(logits, top_k=4, top_p=0.01).tolist()) == {0}


def test_top_p_is_a_share_of_the_shortlist() -> None:
    logits = torch.tensor([0.4, 0.3, 0.2, 0.1]).log().tolist()
    # the likeliest holds 0.4 of the whole but 0.57 of a shortlist of two: at top-p 0.5 it stands alone
    assert set(drawn(logits, top_k=2, top_p=0.5).tolist()) == {0}
    assert set(drawn(logits, top_k=2, top_p=0.6).tolist()) == {0, 1}


def test_draws_follow_the_softmax_when_nothing_is_cut() -> None:
    logits = torch.tensor([1.0, 0.0, -1.0, 2.0])
    counts = torch.bincount(drawn(logits.tolist(), rows=40_000, top_k=4, top_p=1.0), minlength=4)
    assert torch.allclose(counts / counts.sum(), torch.softmax(logits, 0), atol=0.01)


def test_same_seed_same_tokens_and_the_global_stream_is_untouched() -> None:
    logits = torch.randn(1, 50).tolist()[0]
    torch.manual_seed(5)
    state = torch.random.get_rng_state()
    assert torch.equal(drawn(logits, rows=64, seed=1), drawn(logits, rows=64, seed=1))
    assert not torch.equal(drawn(logits, rows=64, seed=1), drawn(logits, rows=64, seed=2))
    assert torch.equal(torch.random.get_rng_state(), state)


@pytest.fixture
def model(llama_dir: Path) -> torch.nn.Module:
    return AutoModelForCausalLM.from_pretrained(llama_dir).eval()


def test_generate_batches_whole_fixed_length_samples_deterministically(model: torch.nn.Module, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sampling, "CPU_BATCH", 2)  # 5 samples: batches of 2, 2 and 1
    rates: list[Rate] = []
    first = generate(model, 1, 5, 9, seed=3, on_progress=rates.append)
    assert [s.shape for s in first] == [torch.Size([1, 9])] * 5 and all(s[0, 0] == 1 for s in first)
    assert [r.tokens for r in rates] == list(range(2, 33, 2)) + list(range(33, 41))
    assert rates[-1].total == 5 * 8 and rates[-1].eta_seconds == 0
    assert all(torch.equal(a, b) for a, b in zip(first, generate(model, 1, 5, 9, seed=3)))
    assert not all(torch.equal(a, b) for a, b in zip(first, generate(model, 1, 5, 9, seed=4)))


def test_end_of_sequence_does_not_end_a_sample(model: torch.nn.Module) -> None:
    # the end-of-sequence token made likely at every step (about half the mass)
    model.lm_head.register_forward_hook(lambda module, args, out: out + 6.0 * torch.nn.functional.one_hot(torch.tensor(EOS), out.shape[-1]))
    samples = torch.cat(generate(model, 1, 4, 40, seed=0))
    assert samples.shape == (4, 40)
    ends = samples[:, 1:] == EOS
    assert 0.2 < ends.float().mean() < 0.9  # drawn often, and often not
    after = [row[int(torch.nonzero(row == EOS)[0]) + 1 :] for row in samples]
    assert all((tail != EOS).any() for tail in after)  # sampling goes on after the first one


def test_the_cache_gives_the_plain_forward_logits_one_token_a_step(model: torch.nn.Module, monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[torch.Tensor] = []
    widths: list[int] = []
    monkeypatch.setattr(sampling, "next_tokens", lambda logits, generator: seen.append(logits) or logits.argmax(-1))
    model.model.embed_tokens.register_forward_hook(lambda module, args, out: widths.append(args[0].shape[1]))
    ids = torch.cat(generate(model, 1, 3, 12, seed=0))
    assert widths == [1] * 11
    with torch.no_grad():
        plain = model(input_ids=ids).logits
    assert torch.allclose(torch.stack(seen, 1), plain[:, :-1], atol=1e-5)
    assert torch.equal(ids[:, 1:], plain[:, :-1].argmax(-1))


def test_reporter_turns_rates_into_progress_events_with_tokens_per_second() -> None:
    out = io.StringIO()
    count = Reporter(json_lines=True, bars=False, out=out, interval=0).token_counter("calibrate")
    count(Rate(tokens=250, total=1000, seconds=2.0))
    count(Rate(tokens=1000, total=1000, seconds=8.0))
    first, last = (json.loads(line) for line in out.getvalue().splitlines())
    assert first == {"event": "progress", "stage": "calibrate", "percent": 25.0, "tokens": 250, "totalTokens": 1000,
                     "tokensPerSecond": 125.0, "etaSeconds": 6}
    assert (last["percent"], last["etaSeconds"]) == (100.0, 0)
