"""Incremental detokenization: whole UTF-8 characters only (Chinese, emoji under byte-level BPE), the
same text as a full decode, and stop strings that span token boundaries."""
from __future__ import annotations

import pytest

from lmforge.infer.detokenize import IncrementalDetokenizer, TokenBytes
from lmforge.tokenizer import TokenizerConfig, train_tokenizer

CORPUS = ["the cat sat on the mat. 猫坐在垫子上。", "数据，训练，模型！ hello world 🙂",
          "more text: 你好世界 and 🎉"] * 30
TEXTS = ["猫坐在垫子上 😀 🦄 cat", "训练模型🎉🎉 world 你好", "plain ascii text",
         "罕见字：鑫龘𠀀 ☃"]  # unseen characters: byte-level BPE falls back to single-byte tokens


@pytest.fixture(scope="module")
def byte_bpe():
    return train_tokenizer(CORPUS, TokenizerConfig(kind="byte_bpe", vocab_size=320, min_frequency=2))


def _stream(detokenizer: IncrementalDetokenizer, ids: list[int]) -> list[str]:
    return [detokenizer.push(i) for i in ids] + [detokenizer.flush()]


def test_byte_level_stream_never_emits_a_broken_character(byte_bpe):
    table = TokenBytes(byte_bpe)
    for text in TEXTS:
        ids = byte_bpe.encode(text)
        assert any(table(i).decode("utf-8", errors="replace") != table(i).decode("utf-8", errors="ignore")
                   for i in ids) or text.isascii()  # some token really is a partial character
        chunks = _stream(IncrementalDetokenizer(table), ids)
        assert all("\ufffd" not in chunk for chunk in chunks)
        assert "".join(chunks) == text == byte_bpe.decode(ids)


def test_partial_character_is_held_until_complete(byte_bpe):
    ids = byte_bpe.encode("🦄")  # unseen emoji: 4 bytes, several byte tokens
    assert len(ids) > 1
    detokenizer = IncrementalDetokenizer(TokenBytes(byte_bpe))
    assert [detokenizer.push(i) for i in ids[:-1]] == [""] * (len(ids) - 1)
    assert detokenizer.push(ids[-1]) == "🦄"
    truncated = IncrementalDetokenizer(TokenBytes(byte_bpe))
    assert "".join(_stream(truncated, ids[:-1])) == byte_bpe.decode(ids[:-1])  # U+FFFD only at the very end


@pytest.mark.parametrize("kind", ["bpe", "unigram", "wordpiece"])
def test_token_bytes_match_decode_for_every_tokenizer_kind(kind):
    tokenizer = train_tokenizer(CORPUS, TokenizerConfig(kind=kind, vocab_size=400, min_frequency=1))
    table = TokenBytes(tokenizer)
    for text in TEXTS[:3]:
        ids = tokenizer.encode(text)
        assert "".join(_stream(IncrementalDetokenizer(table, skip_special_tokens=False), ids)) == tokenizer.decode(ids)
        assert "".join(_stream(IncrementalDetokenizer(table), ids)) == tokenizer.decode(ids, skip_special_tokens=True)


def test_special_tokens_are_skipped_or_written(byte_bpe):
    ids = byte_bpe.encode("cat<|im_end|>mat")
    table = TokenBytes(byte_bpe)
    assert "".join(_stream(IncrementalDetokenizer(table), ids)) == "catmat"
    kept = IncrementalDetokenizer(table, skip_special_tokens=False)
    assert "".join(_stream(kept, ids)) == "cat<|im_end|>mat"


def _char_ids(byte_bpe, text: str) -> list[int]:
    """One token per character (or per byte), so a stop string certainly spans tokens."""
    return [i for ch in text for i in byte_bpe.encode(ch)]


def test_stop_string_spanning_tokens_is_never_emitted(byte_bpe):
    detokenizer = IncrementalDetokenizer(TokenBytes(byte_bpe), stop=["<END>"])
    chunks = [detokenizer.push(i) for i in _char_ids(byte_bpe, "ab<EN")]
    assert "".join(chunks) == "ab"  # "<EN" might begin "<END>": held
    assert detokenizer.push(byte_bpe.encode("D")[0]) == ""
    assert detokenizer.push(byte_bpe.encode(">")[0]) == ""
    assert detokenizer.stopped_by == "<END>" and detokenizer.text == "ab"
    assert detokenizer.push(byte_bpe.encode("x")[0]) == "" and detokenizer.flush() == ""


def test_held_text_is_released_when_it_cannot_be_a_stop(byte_bpe):
    detokenizer = IncrementalDetokenizer(TokenBytes(byte_bpe), stop=["<END>", "猫坐"])
    seen, out = {}, ""
    for ch in "x<EN!猫y":
        out += "".join(detokenizer.push(i) for i in byte_bpe.encode(ch))
        seen[ch] = out
    assert seen["<"] == seen["N"] == "x"       # "<", "<E", "<EN" may begin "<END>"
    assert seen["!"] == seen["猫"] == "x<EN!"  # "<EN!" cannot; "猫" may begin "猫坐"
    assert seen["y"] == "x<EN!猫y"
    assert detokenizer.flush() == "" and detokenizer.stopped_by is None


def test_earliest_stop_wins_and_can_be_included(byte_bpe):
    ids = _char_ids(byte_bpe, "one two three")
    detokenizer = IncrementalDetokenizer(TokenBytes(byte_bpe), stop=["three", "two"])
    assert "".join(_stream(detokenizer, ids)) == "one "
    assert detokenizer.stopped_by == "two"
    included = IncrementalDetokenizer(TokenBytes(byte_bpe), stop=["two"], include_stop_str_in_output=True)
    assert "".join(_stream(included, ids)) == "one two"
    chinese = IncrementalDetokenizer(TokenBytes(byte_bpe), stop=["垫子"])
    assert "".join(_stream(chinese, byte_bpe.encode("猫坐在垫子上"))) == "猫坐在"
