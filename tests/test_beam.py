"""Beam search: greedy at one beam, exhaustive search with enough beams, transformers' result on the same weights."""
from __future__ import annotations

import itertools

import pytest
import torch

from lmforge.infer import generate
from lmforge.infer.beam import beam_search
from lmforge.model import ModelConfig, Transformer


def tiny(vocab: int = 8, seed: int = 0, std: float = 1.0) -> Transformer:
    torch.manual_seed(seed)
    model = Transformer(ModelConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_layers=2,
                                    num_heads=4, num_kv_heads=2, max_position_embeddings=64)).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1:
                p.normal_(0, std)
    return model


@torch.no_grad()
def sequence_logprob(model, prompt: list[int], new: list[int]) -> float:
    ids = torch.tensor([prompt + new])
    logprobs = torch.log_softmax(model(ids).float(), -1)[0]
    return sum(float(logprobs[len(prompt) - 1 + i, t]) for i, t in enumerate(new))


def test_one_beam_is_greedy():
    model = tiny(vocab=32)
    prompt = [1, 5, 7]
    greedy = generate(model, [prompt], 10, temperature=0.0)[0]
    assert beam_search(model, prompt, num_beams=1, max_new_tokens=10)[0].token_ids == greedy


def test_enough_beams_find_the_exhaustive_optimum():
    model = tiny(vocab=6, seed=3)
    prompt, length = [2, 4], 3
    best = max(itertools.product(range(6), repeat=length), key=lambda s: sequence_logprob(model, prompt, list(s)))
    hyp = beam_search(model, prompt, num_beams=36, max_new_tokens=length, length_penalty=0.0)[0]
    assert hyp.token_ids == list(best)
    assert hyp.sum_logprobs == pytest.approx(sequence_logprob(model, prompt, list(best)), abs=1e-4)
    narrow = beam_search(model, prompt, num_beams=2, max_new_tokens=length, length_penalty=0.0)[0]
    assert narrow.sum_logprobs <= hyp.sum_logprobs + 1e-6
    greedy = generate(model, [prompt], length)[0]
    assert hyp.sum_logprobs >= sequence_logprob(model, prompt, greedy) - 1e-6


def test_eos_ends_a_hypothesis_and_scores_are_length_normalised():
    model = tiny(vocab=10, seed=5)
    hyps = beam_search(model, [1, 2, 3], num_beams=4, max_new_tokens=8, eos_token_id=0, num_return=4)
    assert len(hyps) == 4 and [h.score for h in hyps] == sorted((h.score for h in hyps), reverse=True)
    for h in hyps:
        assert 0 not in h.token_ids[:-1]  # EOS only ever last
        assert h.score == pytest.approx(h.sum_logprobs / len(h.token_ids), abs=1e-5)
        assert h.sum_logprobs == pytest.approx(sequence_logprob(model, [1, 2, 3], h.token_ids), abs=1e-4)


@pytest.mark.parametrize("eos", [None, 0])
def test_same_best_sequence_as_transformers(tmp_path, eos):
    transformers = pytest.importorskip("transformers")
    model = tiny(vocab=24, seed=11, std=0.6)
    model.config.eos_token_id = eos
    model.save_pretrained(tmp_path)
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    prompt = [3, 9, 4, 17]
    with torch.no_grad():
        out = hf.generate(torch.tensor([prompt]), num_beams=4, do_sample=False, max_new_tokens=7, min_new_tokens=0,
                          length_penalty=1.0, early_stopping=False, eos_token_id=eos, pad_token_id=1)
    expected = out[0, len(prompt):].tolist()
    got = beam_search(model, prompt, num_beams=4, max_new_tokens=7, eos_token_id=eos)[0].token_ids
    assert got == expected[:len(got)] and all(t == 1 for t in expected[len(got):])  # HF pads after EOS


def test_bad_arguments():
    from lmforge.core.errors import ConfigError

    model = tiny()
    with pytest.raises(ConfigError):
        beam_search(model, [1], num_beams=0)
    with pytest.raises(ConfigError):
        beam_search(model, [], num_beams=2)
    with pytest.raises(ConfigError):
        beam_search(model, [1], num_beams=2, num_return=3)


def test_generate_command_with_beams(tmp_path, capsys):
    from lmforge.cli import main
    from lmforge.tokenizer import TokenizerConfig, train_tokenizer

    tok = train_tokenizer(["the cat sat on the mat"] * 50 + ["a dog ran in the park"] * 50,
                          TokenizerConfig(vocab_size=300, min_frequency=2))
    model = tiny(vocab=tok.vocab_size, seed=2, std=0.3)
    model.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    assert main(["generate", f"model={tmp_path}", "prompt=[the cat]", "num_beams=3", "max_new_tokens=5"]) == 0
    hyp = beam_search(model, tok.encode("the cat"), num_beams=3, max_new_tokens=5, eos_token_id=tok.eos_id)[0]
    assert tok.decode(hyp.token_ids, skip_special_tokens=True) in capsys.readouterr().out
    assert main(["generate", f"model={tmp_path}", "prompt=[x]", "num_beams=2", "prompt_lookup=2"]) == 2
