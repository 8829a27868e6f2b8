"""The quickstart's fact-recall probe: cloze prompts cut before the object, scored under teacher forcing on
the whole statement's tokens, and the prediction shown as whole characters even where byte-level pieces
straddle Chinese characters."""
from __future__ import annotations

import torch

from lmforge.data.synthetic import generate_corpus, make_world
from lmforge.quickstart.recall import ClozePrompt, cloze_prompts, fact_recall
from lmforge.tokenizer import TokenizerConfig, train_tokenizer


class _Oracle(torch.nn.Module):
    """Predicts, at every position, the next token of a fixed sequence (a perfect model of that text)."""

    def __init__(self, ids: list[int], vocab: int):
        super().__init__()
        self.ids, self.vocab = ids, vocab
        self.anchor = torch.nn.Parameter(torch.zeros(()))

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        logits = torch.zeros(*input_ids.shape, self.vocab)
        for i in range(min(input_ids.shape[1], len(self.ids)) - 1):
            logits[:, i, self.ids[i + 1]] = 1.0
        return logits


def test_cloze_prompts_and_a_perfect_model_scores_every_hit():
    world = make_world(seed=0)
    prompts = cloze_prompts(world, num_facts=30)
    assert {p.lang for p in prompts} == {"en", "zh"}
    tok = train_tokenizer([d["text"] for d in generate_corpus(seed=0, num_docs=2000)],
                          TokenizerConfig(vocab_size=4096, min_frequency=2))  # the quickstart's size
    straddling = 0
    for p in prompts:
        encoded = tok.backend.encode(p.prompt + p.answer, add_special_tokens=False)
        scores, rows = fact_recall(_Oracle(encoded.ids, tok.vocab_size), tok, [p])
        assert scores["all"] == 1.0
        (prompt, shown, hit), = rows
        assert hit and prompt == p.prompt
        assert shown == p.answer  # whole characters, also where pieces straddle Chinese characters
        first = max(1, next(i for i, (_, end) in enumerate(encoded.offsets) if end > len(p.prompt)))
        straddling += tok.decode(encoded.ids[first:]) != p.answer  # the predicted pieces alone are not the text
    assert straddling > 0


def test_a_wrong_prediction_is_a_miss():
    tok = train_tokenizer([d["text"] for d in generate_corpus(seed=0, num_docs=200)],
                          TokenizerConfig(vocab_size=400, min_frequency=2))
    right = ClozePrompt("Li Ming lives in", " Qingxi", "en", "f")
    wrong = tok.backend.encode("Li Ming lives in Paris", add_special_tokens=False).ids
    scores, rows = fact_recall(_Oracle(wrong, tok.vocab_size), tok, [right])
    assert scores["en"] == 0.0 and rows[0][2] is False
