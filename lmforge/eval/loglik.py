"""Log-likelihood of continuations given contexts: the primitive multiple-choice scoring is built on.

`loglikelihood(model, tokenizer, [(context, continuation), ...])` gives, per request, the summed log
probability of the continuation's tokens, whether greedy decoding would have produced exactly them, and
how many tokens they are — lm-eval's `loglikelihood` request, so an lm-eval adapter can call this as is.

Why joint tokenisation: byte-level BPE merges across the context/continuation boundary ("的首" can be one
token in Chinese; "Answer: A" keeps the space with the letter), so encoding the two parts separately gives
ids the model never sees in running text. We encode `context + continuation` once and use the character
offsets to find the first token that reaches past the context; that token and all after it are the
continuation. A token straddling the boundary is therefore scored as part of the continuation, with the
shorter context before it.

Batching never changes a number: rows are right-padded (a causal model's real positions cannot see the pads
after them, and the attention mask hides them anyway), requests are sorted longest first so a batch wastes
little padding, and results come back in the caller's order. Requests whose model input is identical
(e.g. one context with the single-token answers " A" .. " D") share one row.
"""
from __future__ import annotations

from typing import Any, NamedTuple, Sequence

import torch
from torch import nn


class LogLikelihood(NamedTuple):
    """The continuation's summed log-probability (nats), whether it is the greedy decode, and its length."""

    logprob: float
    is_greedy: bool
    num_tokens: int


def encode_with_offsets(tokenizer: Any, text: str, add_special_tokens: bool = False) -> tuple[list[int], list[tuple[int, int]]]:
    """Ids of `text` and each token's (start, end) character span in it.

    Takes an lmforge `Tokenizer` (its `backend` is a HF `tokenizers.Tokenizer`), a bare `tokenizers`
    tokenizer, or a transformers fast tokenizer (through `return_offsets_mapping`)."""
    backend = getattr(tokenizer, "backend", tokenizer)
    if hasattr(backend, "encode") and hasattr(backend, "get_vocab_size"):  # a `tokenizers.Tokenizer`
        encoding = backend.encode(text, add_special_tokens=add_special_tokens)
        return list(encoding.ids), [tuple(o) for o in encoding.offsets]
    if callable(tokenizer):  # transformers PreTrainedTokenizerFast
        out = tokenizer(text, add_special_tokens=add_special_tokens, return_offsets_mapping=True)
        return list(out["input_ids"]), [tuple(o) for o in out["offset_mapping"]]
    raise TypeError(f"cannot get token offsets from {type(tokenizer).__name__}: pass an lmforge Tokenizer")


def prefix_token_id(tokenizer: Any) -> int:
    """The id that stands in for an empty context: BOS when the tokenizer has one, else EOS (as lm-eval)."""
    for name in ("bos_id", "bos_token_id", "eos_id", "eos_token_id"):
        value = getattr(tokenizer, name, None)
        if isinstance(value, int):
            return value
    raise ValueError("an empty context needs a BOS or EOS token to condition on, and the tokenizer has neither")


def encode_pair(tokenizer: Any, context: str, continuation: str,
                add_special_tokens: bool = False) -> tuple[list[int], list[int]]:
    """(context ids, continuation ids) from ONE encoding of `context + continuation`.

    The continuation starts at the first token whose span ends past the context's last character, so
    `context_ids + continuation_ids` is exactly the joint encoding. An empty context side becomes the
    BOS/EOS prefix token, so the first continuation token is still predicted from something."""
    if not continuation:
        raise ValueError(f"empty continuation for context {context[-60:]!r}: there is nothing to score")
    ids, offsets = encode_with_offsets(tokenizer, context + continuation, add_special_tokens)
    boundary = len(context)
    split = next((i for i, (_, end) in enumerate(offsets) if end > boundary), len(ids))
    context_ids, continuation_ids = ids[:split], ids[split:]
    if not continuation_ids:
        raise ValueError(f"continuation {continuation!r} produced no tokens of its own")
    if not context_ids:
        context_ids = [prefix_token_id(tokenizer)]
    return context_ids, continuation_ids


def _model_device(model: nn.Module) -> torch.device:
    for tensor in (*model.parameters(), *model.buffers()):
        return tensor.device
    return torch.device("cpu")


def _max_length(model: nn.Module, max_length: int | None) -> int | None:
    if max_length is not None:
        return max_length
    config = getattr(model, "config", None)
    return getattr(config, "max_position_embeddings", None)


def _model_inputs(context_ids: list[int], continuation_ids: list[int], max_length: int | None) -> list[int]:
    """What the model reads: context + continuation minus the last token, left-truncated to max_length."""
    tokens = context_ids + continuation_ids
    if max_length is not None and len(continuation_ids) > max_length:
        raise ValueError(f"a continuation of {len(continuation_ids)} tokens cannot be scored within "
                         f"max_length={max_length}")
    inputs = tokens[:-1]
    return inputs[-max_length:] if max_length is not None else inputs


@torch.inference_mode()
def score_token_requests(
    model: nn.Module,
    requests: Sequence[tuple[list[int], list[int]]],
    batch_size: int = 8,
    pad_id: int = 0,
    max_length: int | None = None,
) -> list[LogLikelihood]:
    """`loglikelihood` on already-tokenised (context ids, continuation ids) pairs (context non-empty)."""
    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size} must be >= 1")
    max_length = _max_length(model, max_length)
    rows: dict[tuple[int, ...], list[int]] = {}  # model input -> indices of the requests it serves
    for index, (context_ids, continuation_ids) in enumerate(requests):
        if not context_ids or not continuation_ids:
            raise ValueError(f"request {index}: context and continuation must both have tokens")
        rows.setdefault(tuple(_model_inputs(context_ids, continuation_ids, max_length)), []).append(index)
    # Longest first: the first batch shows at once whether memory suffices; ties keep request order.
    order = sorted(rows, key=lambda key: (-len(key), rows[key][0]))
    device = _model_device(model)
    was_training = model.training
    model.eval()
    results: list[LogLikelihood | None] = [None] * len(requests)
    try:
        for start in range(0, len(order), batch_size):
            chunk = order[start:start + batch_size]
            width = len(chunk[0])
            input_ids = torch.full((len(chunk), width), pad_id, dtype=torch.long)
            attention_mask = torch.zeros((len(chunk), width), dtype=torch.long)
            for row, key in enumerate(chunk):
                input_ids[row, :len(key)] = torch.tensor(key, dtype=torch.long)
                attention_mask[row, :len(key)] = 1
            logits = model(input_ids.to(device), attention_mask=attention_mask.to(device))
            for row, key in enumerate(chunk):
                for index in rows[key]:
                    continuation = requests[index][1]
                    # the last len(continuation) inputs' logits predict the continuation's tokens
                    scores = torch.log_softmax(logits[row, len(key) - len(continuation):len(key)].float(), dim=-1)
                    target = torch.tensor(continuation, dtype=torch.long, device=scores.device)
                    logprob = scores.gather(1, target[:, None]).sum()
                    greedy = bool((scores.argmax(-1) == target).all())
                    results[index] = LogLikelihood(float(logprob), greedy, len(continuation))
    finally:
        model.train(was_training)
    return results  # type: ignore[return-value]


def loglikelihood(
    model: nn.Module,
    tokenizer: Any,
    requests: Sequence[tuple[str, str]],
    batch_size: int = 8,
    max_length: int | None = None,
    add_special_tokens: bool = False,
) -> list[LogLikelihood]:
    """(logprob sum, is_greedy, num_tokens) of each continuation given its context, in request order.

    `max_length` (default: the model's max_position_embeddings) left-truncates long inputs, keeping the
    continuation whole; `add_special_tokens` runs the tokenizer's post-processor (e.g. a Llama BOS) — off by
    default, as lm-eval's HF model does."""
    encoded = [encode_pair(tokenizer, context, continuation, add_special_tokens) for context, continuation in requests]
    pad_id = next((v for v in (getattr(tokenizer, "pad_id", None), getattr(tokenizer, "eos_id", None))
                   if isinstance(v, int)), 0)
    return score_token_requests(model, encoded, batch_size=batch_size, pad_id=pad_id, max_length=max_length)
