"""SFT data: formats → messages, assistant-only labels, packing without cross-talk, resumable batches."""
from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from lmforge.core.errors import DataError
from lmforge.data.readers import ReadStats
from lmforge.finetune import (SFTBatches, add_neftune, read_conversations, sft_loss, tokenize_all,
                              tokenize_conversation)
from lmforge.train.losses import IGNORE_INDEX

CHAT = [{"role": "system", "content": "Answer briefly."},
        {"role": "user", "content": "What is the capital of Wamia?"},
        {"role": "assistant", "content": "The capital of Wamia is Jainmouth."},
        {"role": "user", "content": "And its population?"},
        {"role": "assistant", "content": "About four million people."}]


@pytest.fixture(scope="module")
def tokenizer(tiny_data):
    from lmforge.tokenizer import Tokenizer

    return Tokenizer.from_pretrained(tiny_data.parent / "tokenizer")


def tiny_model(vocab_size: int, seed: int = 0):
    from lmforge.model import PRESETS, Transformer

    cfg = replace(PRESETS["llama-tiny"](), vocab_size=vocab_size, hidden_size=64, intermediate_size=128,
                  num_layers=2, num_heads=4, num_kv_heads=2, max_position_embeddings=256)
    torch.manual_seed(seed)
    return Transformer(cfg).eval()


def _write_jsonl(path: Path, lines: list) -> Path:
    path.write_text("".join((line if isinstance(line, str) else json.dumps(line)) + "\n" for line in lines))
    return path


def test_each_format_parses_to_the_same_messages(tmp_path):
    messages = {"messages": [{"role": "user", "content": "Say hi"}, {"role": "assistant", "content": "hi"}]}
    alpaca = {"instruction": "Say hi", "input": "", "output": "hi"}
    sharegpt = {"conversations": [{"from": "human", "value": "Say hi"}, {"from": "gpt", "value": "hi"}]}
    path = _write_jsonl(tmp_path / "mixed.jsonl", [messages, alpaca, sharegpt])
    convs = read_conversations(path)
    assert convs == [messages["messages"]] * 3
    with_input = read_conversations(_write_jsonl(tmp_path / "a.jsonl", [
        {"instruction": "Translate", "input": "chat", "output": "cat", "system": "Be exact."}]), fmt="alpaca")
    assert with_input == [[{"role": "system", "content": "Be exact."},
                           {"role": "user", "content": "Translate\n\nchat"}, {"role": "assistant", "content": "cat"}]]
    sys_gpt = read_conversations(_write_jsonl(tmp_path / "s.jsonl", [{"conversations": [
        {"from": "system", "value": "S"}, {"from": "human", "value": "Q"}, {"from": "gpt", "value": "A"}]}]))
    assert [m["role"] for m in sys_gpt[0]] == ["system", "user", "assistant"]


def test_bad_line_raises_with_file_and_line_or_is_skipped_and_counted(tmp_path):
    good = {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}
    path = _write_jsonl(tmp_path / "bad.jsonl", [good, {"messages": [{"role": "wizard", "content": "x"}]},
                                                  "{not json", {"text": "no conversation"}, good])
    with pytest.raises(DataError, match=rf"{path}:2: .*role 'wizard'"):
        read_conversations(path)
    stats = ReadStats()
    assert len(read_conversations(path, on_error="skip", stats=stats)) == 2
    assert stats.skipped == 3 and stats.skipped_examples[1].startswith(f"{path}:3:")


def test_assistant_only_labels_cover_exactly_the_replies(tokenizer):
    example = tokenize_conversation(tokenizer, CHAT, max_seq_len=512)
    full = tokenizer.encode_chat(CHAT).input_ids
    assert example.input_ids == full[:-1] and len(example.labels) == len(example.input_ids)
    targets = [t for t in example.labels if t != IGNORE_INDEX]
    assert tokenizer.decode(targets) == "The capital of Wamia is Jainmouth.<|im_end|>About four million people.<|im_end|>"
    # each label is the next input token (shifted for causal_lm_loss)
    for t, label in enumerate(example.labels):
        assert label in (IGNORE_INDEX, full[t + 1])
    everything = tokenize_conversation(tokenizer, CHAT, max_seq_len=512, train_on_prompt=True)
    assert everything.labels == full[1:]
    short = tokenize_conversation(tokenizer, CHAT, max_seq_len=20, train_on_prompt=True)
    assert len(short.input_ids) == 20 and short.labels == full[1:21]


def _conversations(n: int) -> list[list[dict]]:
    return [[{"role": "user", "content": f"Question number {i}: what is {i} plus {i}?"},
             {"role": "assistant", "content": f"It is {2 * i}." + " Indeed." * (i % 3)}] for i in range(n)]


def test_packed_batch_matches_unpacked_loss(tokenizer):
    examples = tokenize_all(tokenizer, _conversations(7), max_seq_len=128)
    model = tiny_model(tokenizer.vocab_size)
    packed = SFTBatches(examples, batch_size=2, seq_len=160, packing=True, shuffle=False, epochs=1)
    rows = packed.rows(0)
    assert any(len(r) > 1 for r in rows) and sorted(i for r in rows for i in r) == list(range(7))
    one_batch = next(iter(SFTBatches(examples, batch_size=2, seq_len=160, packing=True, shuffle=False, epochs=1)))
    assert "document_ids" in one_batch and int(one_batch["document_ids"].max()) >= 1
    loss_packed = sft_loss(model, packed)
    loss_unpacked = sft_loss(model, SFTBatches(examples, batch_size=1, seq_len=160, shuffle=False, epochs=1))
    assert loss_packed["val_tokens"] == loss_unpacked["val_tokens"] == sum(e.num_targets for e in examples)
    assert abs(loss_packed["val_loss"] - loss_unpacked["val_loss"]) <= 1e-5


def _take(source: SFTBatches, n: int) -> list[dict]:
    out, it = [], iter(source)
    while len(out) < n:
        try:
            out.append(next(it))
        except StopIteration:  # epoch boundary, as the Trainer's _Endless does
            it = iter(source)
    return out


@pytest.mark.parametrize("packing", [False, True])
def test_loader_resume_gives_identical_batches(tokenizer, packing):
    examples = tokenize_all(tokenizer, _conversations(9), max_seq_len=128)

    def make():
        return SFTBatches(examples, batch_size=2, seq_len=96, seed=5, packing=packing)

    reference = _take(make(), 9)  # crosses epoch boundaries
    first = make()
    _take(first, 4)
    resumed = make()
    resumed.load_state_dict(first.state_dict())
    for a, b in zip(_take(resumed, 5), reference[4:]):
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert make().rows(0) != make().rows(1)  # each epoch reshuffles


def test_neftune_noise_only_while_training(tokenizer):
    model = tiny_model(tokenizer.vocab_size)
    ids = torch.tensor([[1, 2, 3, 4]])
    clean = model(ids)
    handle = add_neftune(model, alpha=5.0)
    assert torch.equal(model.eval()(ids), clean)
    assert not torch.allclose(model.train()(ids), clean)
    handle.remove()
    assert torch.allclose(model.train()(ids), clean)
