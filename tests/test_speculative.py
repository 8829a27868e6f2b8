"""Speculative decoding: greedy output equals the target's; sampled output follows the target's distribution."""
from __future__ import annotations

import pytest
import torch

from lmforge.core.errors import ConfigError
from lmforge.infer import generate
from lmforge.infer.speculative import prompt_lookup, speculative_generate
from lmforge.model import ModelConfig, Transformer


def _model(vocab: int, hidden: int, layers: int, std: float, seed: int) -> Transformer:
    torch.manual_seed(seed)
    config = ModelConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden, num_layers=layers,
                         num_heads=4, num_kv_heads=2, max_position_embeddings=256)
    model = Transformer(config).eval()
    with torch.no_grad():
        for param in model.parameters():
            param.normal_(0.0, std)
    return model


@pytest.fixture(scope="module")
def target():
    return _model(61, 64, 3, 0.3, seed=0)


@pytest.fixture(scope="module")
def draft():
    return _model(61, 32, 1, 0.3, seed=1)


PROMPT = [5, 9, 11, 20, 7, 8, 30, 2, 5, 9, 11]


@pytest.mark.parametrize("k", [1, 4])
def test_greedy_with_a_draft_model_equals_target_greedy(target, draft, k):
    expected = generate(target, [PROMPT], 30)[0]
    out = speculative_generate(target, PROMPT, 30, draft=draft, num_speculative_tokens=k)
    assert out.tokens == expected
    assert out.stats.proposed > 0 and out.stats.new_tokens == 30
    assert out.stats.target_forwards + out.stats.accepted == 30  # each forward yields 1 + accepted tokens


def test_greedy_with_the_target_as_its_own_draft_accepts_everything(target):
    expected = generate(target, [PROMPT], 25)[0]
    out = speculative_generate(target, PROMPT, 25, draft=target, num_speculative_tokens=4)
    assert out.tokens == expected
    assert out.stats.acceptance_rate == 1.0
    assert out.stats.tokens_per_target_forward == pytest.approx(5.0, abs=1.0)  # 4 guesses + 1 bonus per forward


@pytest.mark.parametrize("ngram", [1, 3])
def test_greedy_with_prompt_lookup_equals_target_greedy(target, ngram):
    expected = generate(target, [PROMPT], 40)[0]
    out = speculative_generate(target, PROMPT, 40, prompt_lookup_ngram=ngram, num_speculative_tokens=3)
    assert out.tokens == expected
    assert out.stats.accepted > 0  # greedy output of this model repeats itself: lookup must find some
    assert out.stats.draft_forwards == 0


def test_stops_at_eos_and_respects_max_new_tokens(target, draft):
    full = generate(target, [PROMPT], 20)[0]
    eos = full[6]
    cut = full[: full.index(eos) + 1]
    for kwargs in ({"draft": draft}, {"draft": target}, {"prompt_lookup_ngram": 2}):
        assert speculative_generate(target, PROMPT, 20, eos_token_id=eos, **kwargs).tokens == cut
        for n in (1, 2, 7):
            assert speculative_generate(target, PROMPT, n, **kwargs).tokens == full[:n]


def test_prompt_lookup_finds_the_latest_longest_match():
    assert prompt_lookup([1, 2, 3, 9, 1, 2, 4, 5, 1, 2], 2, 3) == [4, 5, 1]  # latest "1 2" wins
    assert prompt_lookup([7, 1, 2, 3, 8, 2], 3, 2) == [3, 8]                  # falls back to a 1-gram
    assert prompt_lookup([1, 2, 3], 3, 2) == []


def test_rejects_a_draft_with_another_vocabulary(target):
    with pytest.raises(ConfigError, match="vocab_size"):
        speculative_generate(target, PROMPT, 4, draft=_model(50, 32, 1, 0.3, seed=2))


# ---- the sampled output has the target's distribution ----------------------------------------------

VOCAB = 8


def _tv(a: torch.Tensor, b: torch.Tensor) -> float:
    return 0.5 * (a - b).abs().sum().item()


@pytest.mark.parametrize("proposer", ["draft", "lookup"])
def test_rejection_rule_keeps_the_target_distribution(proposer):
    """The accept/resample rule on constructed distributions (vocab 8): guess x ~ q, keep it with
    probability min(1, p/q), else draw from norm(max(0, p - q)). The result must be distributed as p."""
    from lmforge.infer.speculative import _verify

    generator = torch.Generator().manual_seed(0)
    p = torch.softmax(torch.tensor([[2.0, 0.5, -1.0, 1.5, 0.0, -0.5, 1.0, -2.0]]), -1)
    p = torch.cat([p, torch.full((1, VOCAB), 1 / VOCAB)])  # row 1: the bonus distribution (unused when k=1 rejects)
    q = torch.softmax(torch.tensor([[-1.0, 2.0, 1.0, -0.5, 0.5, 1.5, -2.0, 0.0]]), -1)
    assert _tv(p[0], q[0]) > 0.4  # far apart: a rule that ignored p would fail by a wide margin
    trials = 20000
    counts = torch.zeros(VOCAB)
    for _ in range(trials):
        if proposer == "draft":
            guess = int(torch.multinomial(q[0], 1, generator=generator))
            accepted, token = _verify([guess], p, q, 1.0, generator)
        else:  # a fixed point-mass guess, as prompt lookup makes
            accepted, token = _verify([3], p, None, 1.0, generator)
        counts[guess if proposer == "draft" and accepted else 3 if accepted else token] += 1
    # E[TV] for 20000 draws over 8 cells is ~0.008.
    assert _tv(counts / trials, p[0]) < 0.02


def _exact_pair_distribution(model: Transformer, prompt: list[int], temperature: float) -> torch.Tensor:
    """P(second, third new token) [V, V] under plain sampling from `model`, summed over the first."""
    def next_probs(context: list[list[int]]) -> torch.Tensor:
        with torch.no_grad():
            return torch.softmax(model(torch.tensor(context))[:, -1].double() / temperature, dim=-1)

    p1 = next_probs([prompt])[0]
    p2 = next_probs([prompt + [a] for a in range(VOCAB)])                                     # [a, b]
    p3 = next_probs([prompt + [a, b] for a in range(VOCAB) for b in range(VOCAB)]).view(VOCAB, VOCAB, VOCAB)
    return (p1[:, None, None] * p2[:, :, None] * p3).sum(0)


@pytest.mark.parametrize("proposer", ["draft", "lookup"])
def test_sampled_tokens_follow_the_target_distribution(proposer):
    """End to end through both caches: token 2 is the first the rule decides (token 1 comes from the
    prefill); token 3 is the bonus or a plain step. Their joint law must be the target's, not the draft's."""
    target, draft = _model(VOCAB, 16, 1, 0.6, seed=3), _model(VOCAB, 16, 1, 0.6, seed=4)
    prompt = [1, 2, 3, 4, 1, 2, 3, 4, 1, 2]
    kwargs = {"draft": draft, "num_speculative_tokens": 2} if proposer == "draft" else {"prompt_lookup_ngram": 2}
    expected = _exact_pair_distribution(target, prompt, 0.9)
    trials = 2000
    observed = torch.zeros(VOCAB, VOCAB, dtype=torch.float64)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # thousands of tiny forwards: a second thread only adds barrier waits
    try:
        for seed in range(trials):
            tokens = speculative_generate(target, prompt, 3, temperature=0.9, seed=seed, pack_weights=False,
                                          **kwargs).tokens
            observed[tokens[1], tokens[2]] += 1 / trials
    finally:
        torch.set_num_threads(threads)
    # Sampling noise for 2000 draws: E[TV] ~ 0.045 over 64 cells, ~ 0.017 over 8.
    assert _tv(observed.sum(1), expected.sum(1)) < 0.045
    assert _tv(observed, expected) < 0.09
    if proposer == "draft":
        assert _tv(_exact_pair_distribution(draft, prompt, 0.9), expected) > 0.25


def test_generate_command_speculative_and_sink_options_keep_greedy_text(tiny_data, tmp_path, capsys):
    from lmforge.cli import main
    from lmforge.tokenizer import Tokenizer

    model = _model(384, 32, 2, 0.3, seed=5)
    model.save_pretrained(tmp_path / "m")
    Tokenizer.from_pretrained(tiny_data.parent / "tokenizer").save_pretrained(tmp_path / "m")
    base = ["generate", "--model", str(tmp_path / "m"), "--prompt", "Li Ming lives in", "--max_new_tokens", "12"]

    def text(*extra: str) -> str:
        assert main([*base, *extra]) == 0
        return capsys.readouterr().out.splitlines()[0]

    plain = text()
    assert text("--prompt_lookup", "2") == plain
    assert text("--draft", str(tmp_path / "m"), "--num_speculative_tokens", "3") == plain
    assert text("--sink_window", "64") == plain
    assert main([*base, "--prompt", "a,b", "--prompt_lookup", "2"]) == 2  # one sequence only
