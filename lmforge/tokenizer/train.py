"""Train a tokenizer from an iterator of strings with HF `tokenizers`: byte-level BPE, BPE, Unigram, WordPiece.

Every kind is built so that decoding gives back the text that was encoded, Chinese included:
- no normalizer anywhere (lowercasing or NFKC would change the text: NFKC turns "，" into ","),
- byte-level BPE covers all 256 bytes, so any string round-trips exactly;
- BPE and Unigram mark spaces with Metaspace ("▁", no dummy prefix) and fall back to byte tokens
  `<0x00>`…`<0xFF>` for characters never seen in training, as Llama's SentencePiece tokenizers do, so any
  text round-trips too (Unigram exception: the literal text "<0x41>" matches the byte piece, decoding as "A");
- WordPiece also marks spaces with "▁" (BERT's whitespace split cannot tell "你好" from "你 好" when decoding)
  and isolates CJK ideographs as BERT does, so one unseen character costs one `<unk>`, not the whole word.
  It restores text made of characters it knows, except a word starting with "##" right after a special
  token or a CJK character (read as a continuation mark), and spaces inside non-special added tokens.
"""
from __future__ import annotations

import dataclasses
import json
from typing import Iterable, Literal

from tokenizers import Regex, decoders, models, pre_tokenizers, trainers
from tokenizers import Tokenizer as RustTokenizer

from ..config import opt
from ..core.errors import ConfigError
from .chat_template import BUILTIN_TEMPLATES, resolve_chat_template
from .tokenizer import Tokenizer

TokenizerKind = Literal["byte_bpe", "bpe", "unigram", "wordpiece"]
KINDS = ("byte_bpe", "bpe", "unigram", "wordpiece")

_ASCII = [chr(c) for c in range(33, 127)] + ["\n", "\t", "▁"]
ASCII_PIECES = _ASCII + ["##" + c for c in _ASCII]
BYTE_TOKENS = [f"<0x{b:02X}>" for b in range(256)]
# CJK ideographs (basic block, extension A, compatibility): split one per piece for WordPiece, as BERT does.
_CJK = Regex("[\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff]")


@dataclasses.dataclass
class TokenizerConfig:
    """How to train a tokenizer (and which chat template and length limit it carries)."""

    kind: TokenizerKind = opt("byte_bpe", "byte_bpe (GPT-2 style, any text round-trips) | bpe | unigram | wordpiece")
    vocab_size: int = opt(8192, "target vocabulary size, special tokens included")
    min_frequency: int = opt(2, "a merge/word must occur this often to enter the vocabulary (bpe, byte_bpe, wordpiece)")
    special_tokens: list[str] = opt(
        ["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        "special tokens, given the first ids in this order; unk_token is added for kinds that need one",
    )
    bos_token: str = opt("<|endoftext|>", "beginning-of-sequence token (one of special_tokens)")
    eos_token: str = opt("<|endoftext|>", "end-of-sequence / document separator token (one of special_tokens)")
    pad_token: str = opt("<|endoftext|>", "padding token (one of special_tokens)")
    unk_token: str = opt("<unk>", "unknown-piece token, used by bpe, unigram and wordpiece (not byte_bpe)")
    chat_template: str = opt("chatml", f"built-in template name ({', '.join(BUILTIN_TEMPLATES)}) or a Jinja string")
    model_max_length: int = opt(2048, "longest sequence (tokens) the model is meant to see; saved for transformers")
    split_cjk: bool = opt(False, "byte_bpe: make every CJK ideograph its own pre-token, so no merge crosses a "
                                 "character boundary (much better for Chinese at small vocabularies)")

    def validate(self) -> None:
        """Raise ConfigError naming the key when the settings cannot train a working tokenizer."""
        if self.kind not in KINDS:
            raise ConfigError(f"tokenizer.kind={self.kind!r} is not one of {list(KINDS)}")
        for key in ("bos_token", "eos_token", "pad_token"):
            value = getattr(self, key)
            if value not in self.special_tokens:
                raise ConfigError(
                    f"tokenizer.{key}={value!r} must be one of tokenizer.special_tokens {self.special_tokens}"
                )
        if len(set(self.special_tokens)) != len(self.special_tokens):
            raise ConfigError(f"tokenizer.special_tokens has duplicates: {self.special_tokens}")
        seeded, what = (len(ASCII_PIECES), "ASCII pieces") if self.kind == "wordpiece" else (256, "bytes")
        floor = len(self.all_special_tokens()) + seeded
        if self.vocab_size <= floor:
            raise ConfigError(
                f"tokenizer.vocab_size={self.vocab_size} is too small for kind {self.kind!r}: "
                f"it needs more than {floor} (the special tokens plus {seeded} seeded {what})"
            )
        if self.min_frequency < 1:
            raise ConfigError(f"tokenizer.min_frequency={self.min_frequency} must be >= 1")
        if self.model_max_length < 1:
            raise ConfigError(f"tokenizer.model_max_length={self.model_max_length} must be >= 1")
        resolve_chat_template(self.chat_template)

    def all_special_tokens(self) -> list[str]:
        """The special tokens this kind trains with: the configured ones, plus unk where the model uses it."""
        tokens = list(self.special_tokens)
        if self.kind != "byte_bpe" and self.unk_token not in tokens:
            tokens.append(self.unk_token)
        return tokens


def train_tokenizer(texts: Iterable[str], cfg: TokenizerConfig) -> Tokenizer:
    """A tokenizer of `cfg.kind` trained on `texts` (any iterable of strings; read once, streamed)."""
    cfg.validate()
    specials = cfg.all_special_tokens()
    if cfg.kind == "byte_bpe":
        rust = _train_byte_bpe(texts, cfg, specials)
    elif cfg.kind == "bpe":
        rust = _train_bpe(texts, cfg, specials)
    elif cfg.kind == "unigram":
        rust = _train_unigram(texts, cfg, specials)
    else:
        rust = _train_wordpiece(texts, cfg, specials)
    return Tokenizer(
        rust,
        bos_token=cfg.bos_token,
        eos_token=cfg.eos_token,
        pad_token=cfg.pad_token,
        unk_token=None if cfg.kind == "byte_bpe" else cfg.unk_token,
        chat_template=resolve_chat_template(cfg.chat_template),
        model_max_length=cfg.model_max_length,
    )


def _train_byte_bpe(texts: Iterable[str], cfg: TokenizerConfig, specials: list[str]) -> RustTokenizer:
    # GPT-2's layout exactly (split regex, byte alphabet, no prefix space) so converters such as llama.cpp's
    # recognise the pre-tokenizer; the full 256-byte alphabet makes every string encodable.
    tok = RustTokenizer(models.BPE())
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.pre_tokenizer = (pre_tokenizers.Sequence([pre_tokenizers.Split(_CJK, behavior="isolated"), byte_level])
                         if cfg.split_cjk else byte_level)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=cfg.vocab_size,
        min_frequency=cfg.min_frequency,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer)
    return tok


def _metaspace() -> pre_tokenizers.Metaspace:
    # No SentencePiece-style dummy "▁" at the start: the decoder would have to strip one leading space back
    # off, which loses a real one when the text starts with a space. Spaces and "▁" then map one to one.
    return pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="never", split=True)


def _metaspace_decoder() -> decoders.Metaspace:
    return decoders.Metaspace(replacement="▁", prepend_scheme="never")


def _train_bpe(texts: Iterable[str], cfg: TokenizerConfig, specials: list[str]) -> RustTokenizer:
    tok = RustTokenizer(models.BPE(unk_token=cfg.unk_token))
    tok.pre_tokenizer = _metaspace()
    tok.decoder = decoders.Sequence([decoders.ByteFallback(), _metaspace_decoder()])
    trainer = trainers.BpeTrainer(
        vocab_size=cfg.vocab_size,
        min_frequency=cfg.min_frequency,
        special_tokens=specials + BYTE_TOKENS,
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer)
    return _demote_to_vocabulary(tok, BYTE_TOKENS, byte_fallback=True)


def _train_unigram(texts: Iterable[str], cfg: TokenizerConfig, specials: list[str]) -> RustTokenizer:
    tok = RustTokenizer(models.Unigram())
    tok.pre_tokenizer = _metaspace()
    tok.decoder = decoders.Sequence([decoders.ByteFallback(), _metaspace_decoder()])
    trainer = trainers.UnigramTrainer(
        vocab_size=cfg.vocab_size,
        special_tokens=specials + BYTE_TOKENS,
        unk_token=cfg.unk_token,
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer)
    return _demote_to_vocabulary(tok, BYTE_TOKENS, byte_fallback=True)


def _train_wordpiece(texts: Iterable[str], cfg: TokenizerConfig, specials: list[str]) -> RustTokenizer:
    tok = RustTokenizer(models.WordPiece(unk_token=cfg.unk_token, max_input_chars_per_word=100))
    tok.pre_tokenizer = pre_tokenizers.Sequence([_metaspace(), pre_tokenizers.Split(_CJK, behavior="isolated")])
    # Metaspace has already turned every real space into "▁", so the spaces the WordPiece decoder puts between
    # words are all artificial: drop them, then turn "▁" back into spaces.
    tok.decoder = decoders.Sequence(
        [
            decoders.WordPiece(prefix="##", cleanup=False),
            decoders.Replace(" ", ""),
            _metaspace_decoder(),
        ]
    )
    # WordPiece has no byte fallback and turns a whole word with one unknown character into <unk>; seeding
    # every printable ASCII character, word-initial and as a "##" continuation, keeps English representable
    # whatever the corpus held.
    trainer = trainers.WordPieceTrainer(
        vocab_size=cfg.vocab_size,
        min_frequency=cfg.min_frequency,
        special_tokens=specials + ASCII_PIECES,
        continuing_subword_prefix="##",
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer)
    return _demote_to_vocabulary(tok, ASCII_PIECES)


def _demote_to_vocabulary(tok: RustTokenizer, pieces: list[str], byte_fallback: bool = False) -> RustTokenizer:
    """The same tokenizer with `pieces` as plain vocabulary entries instead of added tokens.

    The trainers have no option to seed whole pieces; passing them as special tokens reserves their ids
    right after the real specials, and dropping them from the added tokens here stops the text "<0x41>"
    or "##a" from matching them before the model runs."""
    spec = json.loads(tok.to_str())
    demoted = set(pieces)
    spec["added_tokens"] = [t for t in spec["added_tokens"] if t["content"] not in demoted]
    if byte_fallback:
        spec["model"]["byte_fallback"] = True
    return RustTokenizer.from_str(json.dumps(spec, ensure_ascii=False))
