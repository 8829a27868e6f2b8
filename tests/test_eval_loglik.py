"""Log-likelihood of continuations: joint tokenisation, batching invariance, and a hand loop over the model."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from lmforge.data.synthetic import generate_corpus
from lmforge.eval.loglik import encode_pair, loglikelihood, score_token_requests
from lmforge.model import ModelConfig, Transformer
from lmforge.tokenizer import TokenizerConfig, train_tokenizer


@pytest.fixture(scope="module")
def tokenizer():
    texts = [doc["text"] for doc in generate_corpus(seed=0, num_docs=200)]  # English and Chinese
    return train_tokenizer(texts, TokenizerConfig(vocab_size=600, min_frequency=2))


@pytest.fixture(scope="module")
def model(tokenizer):
    torch.manual_seed(0)
    config = ModelConfig(vocab_size=tokenizer.vocab_size, hidden_size=32, intermediate_size=64, num_layers=2,
                         num_heads=4, num_kv_heads=2, max_position_embeddings=256)
    model = Transformer(config).eval()
    with torch.no_grad():  # weights larger than the default init, so scores differ clearly between options
        for param in model.parameters():
            if param.dim() > 1:
                param.normal_(0.0, 0.3)
    return model


REQUESTS = [
    ("The capital of Vithora is", " Pelmar."),
    ("Question: How many people live there?\nAnswer:", " A"),
    ("Question: How many people live there?\nAnswer:", " B"),
    ("北京是中国的", "首都。"),
    ("萨里亚的人口是多少？答案：", "466万"),
    ("", "Hello world"),
    ("A much longer context that goes on and on, so that the batch needs padding for the short rows.", " yes"),
]


def hand_loglikelihood(model: nn.Module, context_ids: list[int], continuation_ids: list[int]) -> tuple[float, bool]:
    """The continuation's log-probability from one unpadded, unmasked forward pass."""
    tokens = torch.tensor([context_ids + continuation_ids])
    with torch.no_grad():
        logprobs = torch.log_softmax(model(tokens[:, :-1])[0].float(), dim=-1)
    total, greedy = 0.0, True
    for offset, token in enumerate(continuation_ids):
        row = logprobs[len(context_ids) - 1 + offset]
        total += float(row[token])
        greedy &= int(row.argmax()) == token
    return total, greedy


def test_pair_is_split_out_of_one_joint_encoding(tokenizer):
    for context, continuation in REQUESTS[:-2]:
        context_ids, continuation_ids = encode_pair(tokenizer, context, continuation)
        assert context_ids + continuation_ids == tokenizer.encode(context + continuation)
        assert continuation in tokenizer.decode(continuation_ids)  # a boundary-straddling token joins the continuation
    # byte-level BPE merges across a Chinese boundary: encoding the halves apart gives different ids
    text = "北京是中国的首都。萨里亚的人口是多少？"
    differs = [cut for cut in range(1, len(text))
               if tokenizer.encode(text[:cut]) + tokenizer.encode(text[cut:]) != tokenizer.encode(text)]
    assert differs
    for cut in differs:
        context_ids, continuation_ids = encode_pair(tokenizer, text[:cut], text[cut:])
        assert context_ids + continuation_ids == tokenizer.encode(text)


def test_empty_context_is_conditioned_on_the_bos_token(tokenizer):
    context_ids, continuation_ids = encode_pair(tokenizer, "", "Hello world")
    assert context_ids == [tokenizer.bos_id] and continuation_ids == tokenizer.encode("Hello world")


def test_scores_match_a_hand_loop_over_the_model(model, tokenizer):
    results = loglikelihood(model, tokenizer, REQUESTS, batch_size=4)
    for (context, continuation), result in zip(REQUESTS, results):
        context_ids, continuation_ids = encode_pair(tokenizer, context, continuation)
        logprob, greedy = hand_loglikelihood(model, context_ids, continuation_ids)
        assert result.logprob == pytest.approx(logprob, abs=1e-5)
        assert result.is_greedy == greedy and result.num_tokens == len(continuation_ids)
        assert result.logprob < 0


def test_batch_size_does_not_change_any_score(model, tokenizer):
    alone = loglikelihood(model, tokenizer, REQUESTS, batch_size=1)
    for batch_size in (2, 3, len(REQUESTS)):
        batched = loglikelihood(model, tokenizer, REQUESTS, batch_size=batch_size)
        for a, b in zip(alone, batched):
            assert abs(a.logprob - b.logprob) <= 1e-5
            assert (a.is_greedy, a.num_tokens) == (b.is_greedy, b.num_tokens)


def test_padding_never_changes_a_score(model, tokenizer):
    short = [REQUESTS[1]]
    long = [REQUESTS[-1], REQUESTS[1]]  # the long request forces padding onto the short one
    assert loglikelihood(model, tokenizer, short)[0].logprob == pytest.approx(
        loglikelihood(model, tokenizer, long, batch_size=2)[1].logprob, abs=1e-5)
    pairs = [encode_pair(tokenizer, c, x) for c, x in REQUESTS]
    with_zero = score_token_requests(model, pairs, batch_size=len(pairs), pad_id=0)
    with_other = score_token_requests(model, pairs, batch_size=len(pairs), pad_id=7)
    assert [r.logprob for r in with_zero] == [r.logprob for r in with_other]  # pads are never read


class BigramTable(nn.Module):
    """Logits at each position are a fixed row picked by the current token: log-likelihoods by hand."""

    def __init__(self, table: torch.Tensor) -> None:
        super().__init__()
        self.table = nn.Parameter(table, requires_grad=False)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        return self.table[input_ids]


def test_constructed_model_gives_hand_computed_loglikelihoods():
    table = torch.full((4, 4), 0.0)
    table[1, 2] = table[2, 3] = table[3, 1] = 2.0  # 1 -> 2 -> 3 -> 1 is each step's favourite
    model = BigramTable(table)
    favourite, other = torch.log_softmax(torch.tensor([0.0, 0.0, 2.0, 0.0]), 0)[[2, 0]].tolist()
    results = score_token_requests(model, [([0, 1], [2, 3]), ([1], [0]), ([0, 1], [2, 0])], batch_size=2)
    assert results[0].logprob == pytest.approx(2 * favourite) and results[0].is_greedy and results[0].num_tokens == 2
    assert results[1].logprob == pytest.approx(other) and not results[1].is_greedy
    assert results[2].logprob == pytest.approx(favourite + other) and not results[2].is_greedy


def test_long_inputs_are_left_truncated_keeping_the_continuation(model):
    context, continuation = list(range(5, 45)), [7, 8, 9]
    truncated = score_token_requests(model, [(context, continuation)], max_length=16)[0]
    kept = (context + continuation)[-17:]  # 16 model inputs + the last target
    logprob, _ = hand_loglikelihood(model, kept[:-3], kept[-3:])
    assert truncated.logprob == pytest.approx(logprob, abs=1e-5)
    with pytest.raises(ValueError):
        score_token_requests(model, [([1], list(range(5, 30)))], max_length=16)
