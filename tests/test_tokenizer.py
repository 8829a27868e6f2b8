"""Tokenizer training (four kinds), round-trips, save/load, and parity with transformers.AutoTokenizer."""
from __future__ import annotations

import itertools
import json
import random
import shutil

import pytest

from lmforge.config import load_config
from lmforge.core.errors import CheckpointError, ConfigError
from lmforge.tokenizer import Tokenizer, TokenizerConfig, train_tokenizer

KINDS = ["byte_bpe", "bpe", "unigram", "wordpiece"]


def bilingual_corpus() -> list[str]:
    """300 short English and Chinese sentences, built from a few word lists (deterministic)."""
    en = itertools.product(
        ["The cat", "A small robot", "My teacher", "The old fisherman", "Every student", "Our neighbour"],
        ["likes", "found", "painted", "remembers", "carried"],
        ["a red apple.", "the quiet sea!", "three blue books.", "an old map, again?", "the morning train."],
    )
    zh = itertools.product(
        ["小猫", "机器人", "老师", "渔夫", "每个学生", "邻居"],
        ["喜欢", "看见了", "画了", "记得", "带着"],
        ["一个红苹果。", "安静的大海！", "三本蓝色的书。", "一张旧地图，对吗？", "早上的火车。"],
    )
    return [" ".join(words) for words in en] + ["".join(words) for words in zh]


CORPUS = bilingual_corpus()

# Text every kind must restore exactly: made of characters seen in training, plus ASCII.
ORDINARY = [
    "The cat likes the quiet sea!",
    "Our neighbour painted three blue books.",
    "Hello, world: 42 + x = [y]; #tag ok?",
    "  two leading spaces, and  a double space  ",
    "line one\nline two\n\ttabbed",
    "小猫喜欢安静的大海！",
    "每个学生记得一张旧地图，对吗？",
    "The robot 机器人 found 一个红苹果。",
]

# Text only the byte-level tokenizers (byte_bpe; bpe and unigram through byte fallback) can restore.
ARBITRARY = ORDINARY + [
    "我爱北京天安门，今天天气很好。",
    "emoji 🤖🎉 and a family 👨‍👩‍👧 (ZWJ)",
    "combining é vs é, Ångström, ﬁ ligature, 全角ＡＢＣ",
    "\r\n windows\r\n line\x00nul\x07bell",
    "",
    " ",
    "\n\n\n",
    "日本語のテキスト、한국어 텍스트, русский текст, العربية",
    "code: def f(x):\n    return {'a': x ** 2}  # ok",
]


def random_unicode(rng: random.Random, length: int) -> str:
    """A random string over the BMP and astral planes, surrogates excluded."""
    chars = []
    for _ in range(length):
        while True:
            cp = rng.choice([rng.randint(0, 0x7F), rng.randint(0x80, 0xFFFF), rng.randint(0x10000, 0x10FFFF)])
            if not 0xD800 <= cp <= 0xDFFF:
                break
        chars.append(chr(cp))
    return "".join(chars)


@pytest.fixture(scope="module")
def tokenizers() -> dict[str, Tokenizer]:
    return {kind: train_tokenizer(CORPUS, TokenizerConfig(kind=kind, vocab_size=700, min_frequency=1)) for kind in KINDS}


@pytest.fixture(scope="module")
def transformers_auto():
    transformers = pytest.importorskip("transformers")
    return transformers.AutoTokenizer


@pytest.mark.parametrize("kind", KINDS)
def test_training_learns_merged_pieces(tokenizers, kind):
    tok = tokenizers[kind]
    ids = tok.encode("The cat likes the quiet sea!")
    assert len(ids) < len("The cat likes the quiet sea!")  # learned multi-character pieces
    assert tok.vocab_size > 300


def test_byte_bpe_round_trips_arbitrary_text(tokenizers):
    tok = tokenizers["byte_bpe"]
    rng = random.Random(0)
    texts = ARBITRARY + [random_unicode(rng, rng.randint(1, 40)) for _ in range(200)]
    for text in texts:
        assert tok.decode(tok.encode(text)) == text


@pytest.mark.parametrize("kind", ["bpe", "unigram"])
def test_byte_fallback_kinds_round_trip_arbitrary_text(tokenizers, kind):
    tok = tokenizers[kind]
    rng = random.Random(1)
    texts = ARBITRARY + [random_unicode(rng, rng.randint(1, 40)) for _ in range(200)]
    for text in texts:
        if "▁" in text:  # U+2581 is the space marker itself; it decodes as a space
            continue
        assert tok.decode(tok.encode(text)) == text
    assert tok.unk_id not in tok.encode("我爱北京天安门 🤖")  # unseen characters fall back to bytes, not <unk>


def test_wordpiece_round_trips_ordinary_text_and_marks_unknown_characters(tokenizers):
    tok = tokenizers["wordpiece"]
    for text in ORDINARY:
        assert tok.decode(tok.encode(text)) == text
    # A CJK character never seen costs one <unk>, not the whole sentence.
    ids = tok.encode("我喜欢大海")
    assert ids.count(tok.unk_id) == 1 and tok.decode(ids) == "<unk>喜欢大海"


@pytest.mark.parametrize("kind", KINDS)
def test_special_tokens_encode_as_single_ids(tokenizers, kind):
    tok = tokenizers[kind]
    for token in ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]:
        token_id = tok.token_to_id(token)
        assert token_id is not None and tok.encode(token) == [token_id] and tok.id_to_token(token_id) == token
    ids = tok.encode("<|im_start|>user\n大海<|im_end|><|endoftext|>")
    assert ids[0] == tok.token_to_id("<|im_start|>") and ids[-2:] == [tok.token_to_id("<|im_end|>"), tok.eos_id]
    assert tok.bos_id == tok.eos_id == tok.pad_id == tok.token_to_id("<|endoftext|>") == 0
    assert tok.decode(ids, skip_special_tokens=True) == "user\n大海"
    if kind == "byte_bpe":
        assert tok.unk_token is None and tok.token_to_id("<unk>") is None
    else:
        assert tok.unk_id is not None


@pytest.mark.parametrize("kind", KINDS)
def test_save_and_load_gives_identical_tokenizer(tokenizers, kind, tmp_path):
    tok = tokenizers[kind]
    tok.save_pretrained(tmp_path)
    loaded = Tokenizer.from_pretrained(tmp_path)
    for text in ORDINARY + ["<|im_start|>assistant\nok<|im_end|>"]:
        assert loaded.encode(text) == tok.encode(text)
    assert loaded.fingerprint() == tok.fingerprint()
    assert (loaded.bos_token, loaded.eos_token, loaded.pad_token, loaded.unk_token) == (
        tok.bos_token, tok.eos_token, tok.pad_token, tok.unk_token)
    assert loaded.chat_template == tok.chat_template and loaded.model_max_length == 2048
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    assert config["tokenizer_class"] == "PreTrainedTokenizerFast"
    assert config["added_tokens_decoder"]["0"] == {
        "content": "<|endoftext|>", "lstrip": False, "normalized": False, "rstrip": False,
        "single_word": False, "special": True,
    }
    assert config["chat_template"] == (tmp_path / "chat_template.jinja").read_text()
    special_map = json.loads((tmp_path / "special_tokens_map.json").read_text())
    assert special_map["eos_token"] == "<|endoftext|>"
    assert special_map["additional_special_tokens"] == ["<|im_start|>", "<|im_end|>"]


@pytest.mark.parametrize("kind", KINDS)
def test_transformers_loads_saved_tokenizer_identically(tokenizers, kind, tmp_path, transformers_auto):
    tok = tokenizers[kind]
    tok.save_pretrained(tmp_path)
    hf = transformers_auto.from_pretrained(tmp_path)
    texts = (ARBITRARY if kind != "wordpiece" else ORDINARY) + ["<|im_start|>system\nBe brief.<|im_end|>\n"]
    for text in texts:
        ids = tok.encode(text)
        assert hf.encode(text, add_special_tokens=False) == ids
        assert hf.decode(ids) == tok.decode(ids)
        assert hf.decode(ids, skip_special_tokens=True) == tok.decode(ids, skip_special_tokens=True)
    assert len(hf) == tok.vocab_size
    assert (hf.bos_token_id, hf.eos_token_id, hf.pad_token_id) == (tok.bos_id, tok.eos_id, tok.pad_id)
    assert hf.unk_token == tok.unk_token
    assert hf.model_max_length == 2048
    messages = [{"role": "user", "content": "你好"}, {"role": "assistant", "content": "Hi!"}]
    assert hf.apply_chat_template(messages, tokenize=False) == tok.apply_chat_template(messages)


def test_loads_tokenizer_saved_by_transformers(tokenizers, tmp_path, transformers_auto):
    tok = tokenizers["bpe"]
    tok.save_pretrained(tmp_path / "ours")
    transformers_auto.from_pretrained(tmp_path / "ours").save_pretrained(tmp_path / "theirs")
    loaded = Tokenizer.from_pretrained(tmp_path / "theirs")  # transformers 5: chat_template.jinja, no special map
    for text in ORDINARY:
        assert loaded.encode(text) == tok.encode(text)
    assert (loaded.eos_token, loaded.unk_token, loaded.chat_template) == (tok.eos_token, tok.unk_token, tok.chat_template)


def test_chat_template_read_from_jinja_file_or_tokenizer_config(tokenizers, tmp_path):
    tok = tokenizers["byte_bpe"]
    tok.save_pretrained(tmp_path)
    (tmp_path / "chat_template.jinja").write_text("{{ messages[0]['content'] }}")
    assert Tokenizer.from_pretrained(tmp_path).chat_template == "{{ messages[0]['content'] }}"  # the file wins
    (tmp_path / "chat_template.jinja").unlink()
    assert Tokenizer.from_pretrained(tmp_path).chat_template == tok.chat_template  # from tokenizer_config.json
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    config["chat_template"] = [{"name": "default", "template": "{{ 'd' }}"}, {"name": "tool_use", "template": "t"}]
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    assert Tokenizer.from_pretrained(tmp_path).chat_template == "{{ 'd' }}"


def test_missing_or_broken_files_raise_checkpoint_error(tokenizers, tmp_path):
    with pytest.raises(CheckpointError, match="not found.*nowhere"):
        Tokenizer.from_pretrained(tmp_path / "nowhere")
    tokenizers["bpe"].save_pretrained(tmp_path / "tok")
    (tmp_path / "tok" / "tokenizer.json").unlink()
    with pytest.raises(CheckpointError, match="tokenizer.json is missing"):
        Tokenizer.from_pretrained(tmp_path / "tok")
    (tmp_path / "tok" / "tokenizer.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="tokenizer.json is not a valid"):
        Tokenizer.from_pretrained(tmp_path / "tok")
    tokenizers["bpe"].save_pretrained(tmp_path / "tok")
    (tmp_path / "tok" / "tokenizer_config.json").write_text("[1, 2")
    with pytest.raises(CheckpointError, match="tokenizer_config.json is not valid JSON"):
        Tokenizer.from_pretrained(tmp_path / "tok")


@pytest.mark.parametrize("kind", KINDS)
def test_encode_batch_matches_encode(tokenizers, kind):
    tok = tokenizers[kind]
    texts = CORPUS[::7] + ORDINARY
    assert tok.encode_batch(texts) == [tok.encode(t) for t in texts]


def test_fingerprint_is_stable_and_tells_tokenizers_apart(tokenizers, tmp_path):
    tok = tokenizers["byte_bpe"]
    assert len(tok.fingerprint()) == 64 and tok.fingerprint() == tok.fingerprint()
    tok.save_pretrained(tmp_path / "a")
    Tokenizer.from_pretrained(tmp_path / "a").save_pretrained(tmp_path / "b")
    assert Tokenizer.from_pretrained(tmp_path / "b").fingerprint() == tok.fingerprint()
    retrained = train_tokenizer(CORPUS, TokenizerConfig(kind="byte_bpe", vocab_size=700, min_frequency=1))
    assert retrained.fingerprint() == tok.fingerprint()  # training is deterministic
    smaller = train_tokenizer(CORPUS, TokenizerConfig(kind="byte_bpe", vocab_size=600, min_frequency=1))
    fingerprints = {tok.fingerprint(), smaller.fingerprint()} | {t.fingerprint() for t in tokenizers.values()}
    assert len(fingerprints) == 5


@pytest.mark.parametrize("kind", ["byte_bpe", "unigram"])
def test_added_tokens_encode_whole_and_survive_save_load(tokenizers, kind, tmp_path, transformers_auto):
    tok = Tokenizer.from_pretrained(_saved(tokenizers[kind], tmp_path / "base"))  # a copy we may change
    before = tok.vocab_size
    assert tok.add_tokens(["<tool_call>", "</tool_call>"], special=True) == 2
    assert tok.add_tokens(["dragon", "你好吗"]) == 2
    assert tok.add_tokens(["dragon"]) == 0
    assert tok.vocab_size == before + 4 and tok.token_to_id("dragon") == before + 2
    text = "the dragon says 你好吗<tool_call>{}</tool_call>"
    ids = tok.encode(text)
    assert tok.token_to_id("dragon") in ids and tok.token_to_id("<tool_call>") in ids
    assert tok.decode(ids) == text
    assert tok.decode(ids, skip_special_tokens=True) == "the dragon says 你好吗{}"
    tok.save_pretrained(tmp_path / "grown")
    loaded = Tokenizer.from_pretrained(tmp_path / "grown")
    assert loaded.encode(text) == ids and loaded.vocab_size == tok.vocab_size
    hf = transformers_auto.from_pretrained(tmp_path / "grown")
    assert hf.encode(text, add_special_tokens=False) == ids
    assert hf.decode(ids, skip_special_tokens=True) == tok.decode(ids, skip_special_tokens=True)


def _saved(tok: Tokenizer, path) -> str:
    shutil.rmtree(path, ignore_errors=True)
    tok.save_pretrained(path)
    return str(path)


def test_config_rejects_unusable_settings():
    with pytest.raises(ConfigError, match="eos_token"):
        TokenizerConfig(eos_token="</s>").validate()
    with pytest.raises(ConfigError, match="vocab_size=200 is too small"):
        TokenizerConfig(vocab_size=200).validate()
    with pytest.raises(ConfigError, match="neither a built-in template"):
        TokenizerConfig(chat_template="no-such-template").validate()
    cfg = load_config(TokenizerConfig, overrides=["kind=unigram", "special_tokens=<s>,</s>", "eos_token=</s>",
                                                  "bos_token=<s>", "pad_token=</s>"])
    assert cfg.kind == "unigram" and cfg.all_special_tokens() == ["<s>", "</s>", "<unk>"]
    with pytest.raises(ConfigError, match="kind"):
        load_config(TokenizerConfig, overrides=["kind=sentencepiece"])


def test_byte_bpe_split_cjk_never_merges_across_characters(transformers_auto, tmp_path):
    """split_cjk: every CJK ideograph is its own pre-token, so no token holds bytes of two characters (the
    default byte-level BPE merges across them); any text still round-trips, and transformers agrees."""
    plain = train_tokenizer(CORPUS, TokenizerConfig(kind="byte_bpe", vocab_size=700, min_frequency=1))
    split = train_tokenizer(CORPUS, TokenizerConfig(kind="byte_bpe", vocab_size=700, min_frequency=1, split_cjk=True))

    def straddles(tok: Tokenizer, text: str) -> bool:  # a token whose characters are not exactly one ideograph
        encoding = tok.backend.encode(text, add_special_tokens=False)
        return any(end - start > 1 for start, end in encoding.offsets)

    chinese = "小猫喜欢安静的大海！每个学生记得一张旧地图"
    assert straddles(plain, chinese) and not straddles(split, chinese)
    for text in ARBITRARY:
        assert split.decode(split.encode(text)) == text
    split.save_pretrained(tmp_path)
    hf = transformers_auto.from_pretrained(tmp_path)
    for text in ARBITRARY:
        assert hf.encode(text, add_special_tokens=False) == split.encode(text)
    # No merge spans two ideographs, so GPT-2's own grouping (e.g. llama.cpp's `gpt-2` pre-tokenizer) with
    # this vocabulary gives the same tokens: the split need not be carried by a converter.
    from tokenizers import Tokenizer as RustTokenizer
    from tokenizers import pre_tokenizers

    gpt2_grouping = RustTokenizer.from_str(split.backend.to_str())
    gpt2_grouping.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    for text in ARBITRARY + ["住在 武港，小猫喜欢安静的大海！ 每个学生记得"]:
        assert gpt2_grouping.encode(text, add_special_tokens=False).ids == split.encode(text)
