"""Streaming text out of generated token ids: whole UTF-8 characters only, stop strings across tokens.

Why bytes. Byte-level BPE splits a Chinese character (3 UTF-8 bytes) or an emoji (4) over several tokens,
and a byte-fallback tokenizer emits `<0xE4>`-style byte tokens, so one token's text is not always valid on
its own: decoding token by token shows U+FFFD garbage. Each token is therefore mapped to its raw bytes
once (`TokenBytes`), the bytes are fed to Python's incremental UTF-8 decoder, which returns only complete
characters and keeps an unfinished one's bytes until the next token, and the text is never re-decoded
from the start (O(1) per token, not O(length)).

Why hold text back. A stop string can arrive split over tokens ("<|us" + "er|>"). Text is emitted only up
to the longest suffix that could still begin a stop string; that suffix is held until the next token
either completes a stop string (output ends before it; the held text is never shown) or rules it out.
"""
from __future__ import annotations

import codecs
import json
import re
from collections.abc import Sequence

_BYTE_TOKEN = re.compile(r"<0x([0-9A-Fa-f]{2})>")


def _byte_level_alphabet() -> dict[str, int]:
    """GPT-2's byte → printable character table, inverted (character → byte)."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + \
        list(range(ord("®"), ord("ÿ") + 1))
    chars = printable[:]
    extra = 0
    for byte in range(256):
        if byte not in printable:
            printable.append(byte)
            chars.append(256 + extra)
            extra += 1
    return {chr(c): b for b, c in zip(printable, chars)}


def _flatten_decoders(spec: dict | None) -> list[dict]:
    if spec is None:
        return []
    if spec.get("type") == "Sequence":
        return [d for inner in spec.get("decoders", []) for d in _flatten_decoders(inner)]
    return [spec]


def _piece_bytes(piece: str, decoders: list[dict]) -> bytes | None:
    """Bytes of a vocabulary piece in the middle of a text, or None when a decoder step is not understood."""
    kinds = {d.get("type") for d in decoders}
    if "ByteLevel" in kinds:
        alphabet = _BYTE_LEVEL
        return bytes(alphabet[c] for c in piece) if all(c in alphabet for c in piece) else None
    if "ByteFallback" in kinds and (match := _BYTE_TOKEN.fullmatch(piece)):
        return bytes([int(match.group(1), 16)])
    text = piece
    for decoder in decoders:
        kind = decoder.get("type")
        if kind == "WordPiece":  # continuation pieces glue on, word-initial ones get a separating space
            prefix = decoder.get("prefix", "##")
            text = text[len(prefix):] if text.startswith(prefix) else " " + text
        elif kind == "Replace":
            pattern = decoder.get("pattern", {})
            if "String" not in pattern:
                return None
            text = text.replace(pattern["String"], decoder.get("content", ""))
        elif kind == "Metaspace":
            text = text.replace(decoder.get("replacement", "▁"), " ")
        elif kind in ("ByteFallback", "Fuse", "Strip"):  # Strip only trims the very start/end of a text
            continue
        else:
            return None
    return text.encode("utf-8")


_BYTE_LEVEL = _byte_level_alphabet()


class TokenBytes:
    """token id → the bytes it contributes to a text, built once per tokenizer (lmforge `Tokenizer`).

    Vocabulary pieces are mapped by undoing the tokenizer's decoder (ByteLevel, ByteFallback, Metaspace,
    WordPiece, Replace); a piece whose decoder steps are not understood falls back to `decode([id])`.
    Leading-space stripping (SentencePiece's "first" prepend scheme, `Strip`) is not applied: generated
    text continues a prompt, so its first space is real.
    """

    def __init__(self, tokenizer):
        backend = tokenizer.backend
        decoders = _flatten_decoders(json.loads(backend.to_str()).get("decoder"))
        size = backend.get_vocab_size(with_added_tokens=True)
        self.pieces: list[bytes] = [b""] * size
        for piece, token_id in backend.get_vocab(with_added_tokens=False).items():
            raw = _piece_bytes(piece, decoders)
            self.pieces[token_id] = raw if raw is not None else tokenizer.decode([token_id]).encode("utf-8")
        self.special_ids: set[int] = set()
        for token_id, added in backend.get_added_tokens_decoder().items():
            self.pieces[token_id] = added.content.encode("utf-8")
            if added.special:
                self.special_ids.add(token_id)

    def __call__(self, token_id: int, skip_special_tokens: bool = True) -> bytes:
        if skip_special_tokens and token_id in self.special_ids:
            return b""
        return self.pieces[token_id] if 0 <= token_id < len(self.pieces) else b""


class IncrementalDetokenizer:
    """Feed token ids one at a time; get back the text that is safe to show (see the module docstring)."""

    def __init__(
        self, token_bytes: TokenBytes, stop: Sequence[str] = (), include_stop_str_in_output: bool = False,
        skip_special_tokens: bool = True,
    ):
        self.token_bytes = token_bytes
        self.stop = [s for s in stop if s]
        self.include_stop_str_in_output = include_stop_str_in_output
        self.skip_special_tokens = skip_special_tokens
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._text = ""          # decoded text, emitted part first, then the held-back part
        self._emitted = 0        # characters of _text already returned
        self.stopped_by: str | None = None  # the stop string that ended the text, once one has

    @property
    def text(self) -> str:
        """Everything emitted so far."""
        return self._text[:self._emitted]

    def push(self, token_id: int) -> str:
        """Add one token; returns the newly emittable text ("" while bytes or a stop prefix are held)."""
        if self.stopped_by is not None:
            return ""
        return self._absorb(self._utf8.decode(self.token_bytes(token_id, self.skip_special_tokens)))

    def flush(self) -> str:
        """The sequence ended: emit the held text (an unfinished character becomes U+FFFD, as decode does)."""
        if self.stopped_by is not None:
            return ""
        new = self._absorb(self._utf8.decode(b"", final=True))
        if self.stopped_by is not None:
            return new
        rest = self._text[self._emitted:]
        self._emitted = len(self._text)
        return new + rest

    def _absorb(self, new_text: str) -> str:
        self._text += new_text
        if not self.stop:
            return self._emit(len(self._text))
        match_at, matched = -1, None
        for stop in self.stop:  # earliest stop string starting in the not-yet-emitted text
            at = self._text.find(stop, self._emitted)
            if at != -1 and (match_at == -1 or at < match_at):
                match_at, matched = at, stop
        if matched is not None:
            self.stopped_by = matched
            self._text = self._text[:match_at + (len(matched) if self.include_stop_str_in_output else 0)]
            return self._emit(len(self._text))
        return self._emit(len(self._text) - self._held_suffix())

    def _held_suffix(self) -> int:
        """Length of the longest unemitted suffix that is a proper prefix of some stop string."""
        pending = len(self._text) - self._emitted
        longest = min(max(len(s) for s in self.stop) - 1, pending)
        for size in range(longest, 0, -1):
            tail = self._text[-size:]
            if any(s.startswith(tail) for s in self.stop):
                return size
        return 0

    def _emit(self, upto: int) -> str:
        upto = max(upto, self._emitted)
        chunk = self._text[self._emitted:upto]
        self._emitted = upto
        return chunk
