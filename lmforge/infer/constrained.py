"""Constrained decoding: make every generated text match a JSON schema, a regular expression or a grammar
(Lark syntax in llguidance's dialect, which can embed JSON schemas with `%json {...}`: the server forces
tool calls with one).

How. A grammar library (llguidance) turns the schema/regex into a grammar and, for each sequence, keeps
a *matcher*: a parser fed with the tokens generated so far. Before each sampling step the matcher gives
the set of tokens that can continue a valid text (a bitmask, one bit per vocabulary id); the engine sets
the logits of all other tokens to -inf on tensors and samples as usual, then feeds the chosen token
back. When the grammar is complete and nothing can follow (`is_stopped`) the sequence ends with reason
"stop"; while it is complete but could go on (an integer may get more digits) EOS is allowed too.

The matcher works on bytes, so it needs each token's bytes: `TokenBytes` (detokenize.py) already has
them, and special tokens are flagged so grammar text never matches "<|endoftext|>". A model whose
vocabulary is larger than the tokenizer's (padded embeddings) gets empty byte strings for the extra ids,
which no grammar allows.

JSON is generated compact (no free whitespace between tokens, separators "," and ":"): a small model
allowed free whitespace can spend its whole token budget on spaces. A schema can ask for other
settings through llguidance's "x-guidance" key (e.g. {"whitespace_flexible": true}).

Why llguidance: it installs from PyPI on every platform (one Rust wheel, no compiler, no triton), it
supports JSON schema, regex and Lark, and a mask costs microseconds. It is the `serve` extra; without it
a constrained request is refused with a ConfigError saying what to install.
"""
from __future__ import annotations

from collections import OrderedDict
from functools import lru_cache
from typing import Any

import torch

from ..core.errors import ConfigError
from .detokenize import TokenBytes

_JSON_DEFAULTS = {"whitespace_flexible": False}
_INSTALL_HINT = "pip install 'lmforge[serve]' (or: pip install llguidance)"


def _llguidance(field: str):
    """The llguidance module, or a ConfigError naming the field that needs it."""
    try:
        import llguidance
    except ImportError:
        raise ConfigError(f"SamplingParams.{field} (constrained decoding) needs the llguidance library: "
                          f"{_INSTALL_HINT}") from None
    return llguidance


FIELDS = ("json_schema", "regex", "grammar")


def constraint_field(json_schema: dict | None, regex: str | None, grammar: str | None = None) -> str | None:
    """Which SamplingParams field asks for a constraint ("json_schema", "regex", "grammar" or None)."""
    for field, value in zip(FIELDS, (json_schema, regex, grammar)):
        if value is not None:
            return field
    return None


def check_constraint(json_schema: Any, regex: Any, grammar: Any = None) -> None:
    """Type checks that need no library (ConfigError naming the field)."""
    given = [f for f, v in zip(FIELDS, (json_schema, regex, grammar)) if v is not None]
    if len(given) > 1:
        raise ConfigError(f"SamplingParams: set one of json_schema, regex, grammar; got {', '.join(given)}")
    if json_schema is not None and not isinstance(json_schema, dict):
        raise ConfigError(f"SamplingParams.json_schema must be a JSON schema object (a dict), "
                          f"got {type(json_schema).__name__}")
    for field, value in (("regex", regex), ("grammar", grammar)):
        if value is not None and (not isinstance(value, str) or not value):
            raise ConfigError(f"SamplingParams.{field}={value!r} must be a non-empty string")


def grammar_source(json_schema: dict | None, regex: str | None, grammar: str | None = None) -> str:
    """The llguidance grammar (a string) for a schema, a regex or a Lark grammar; ConfigError if it
    cannot be built."""
    check_constraint(json_schema, regex, grammar)
    field = constraint_field(json_schema, regex, grammar)
    if field is None:
        raise ConfigError("SamplingParams: no json_schema, regex or grammar to build a grammar from")
    llg = _llguidance(field)
    try:
        if field == "regex":
            return llg.LLMatcher.grammar_from_regex(regex)
        if field == "grammar":
            return llg.LLMatcher.grammar_from_lark(grammar)
        return llg.LLMatcher.grammar_from_json_schema(json_schema, defaults=dict(_JSON_DEFAULTS))
    except (ValueError, TypeError) as e:
        raise ConfigError(f"SamplingParams.{field} cannot be used: {e}") from None


def validate_constraint(json_schema: dict | None, regex: str | None, grammar: str | None = None) -> None:
    """Everything about a constraint that can be checked without a tokenizer: types, the library, and
    whether the schema/regex/grammar compiles (ConfigError naming the field). The compile check is cached."""
    check_constraint(json_schema, regex, grammar)
    field = constraint_field(json_schema, regex, grammar)
    if field is None:
        return
    error = _grammar_error(grammar_source(json_schema, regex, grammar), field)
    if error:
        value = {"json_schema": json_schema, "regex": regex, "grammar": grammar}[field]
        raise ConfigError(f"SamplingParams.{field}={_short(value)} cannot be used: {error}")


@lru_cache(maxsize=256)
def _grammar_error(grammar: str, field: str) -> str:
    is_error, messages = _llguidance(field).LLMatcher.validate_grammar_with_warnings(grammar)
    return _one_line(messages) if is_error else ""


class _TokenizerView:
    """What llguidance's TokenizerWrapper reads: token bytes, special ids, EOS, and an encoder."""

    def __init__(self, tokenizer, token_bytes: TokenBytes, vocab_size: int, eos_ids: list[int]):
        pieces = token_bytes.pieces[:vocab_size]
        self.tokens = pieces + [b""] * (vocab_size - len(pieces))
        self.special_token_ids = sorted(i for i in token_bytes.special_ids if i < vocab_size)
        self.eos_token_id = eos_ids[0]
        self.bos_token_id = tokenizer.bos_id
        self._tokenizer = tokenizer

    def __call__(self, text: str | bytes) -> list[int]:
        if isinstance(text, bytes):  # llguidance passes a valid UTF-8 prefix
            text = text.decode("utf-8", errors="replace")
        return self._tokenizer.encode(text)


class GrammarCompiler:
    """One per engine: the llguidance view of the tokenizer (built on first use) and a cache of compiled
    grammars, so a schema that many requests share is compiled once and then copied per sequence."""

    CACHE_SIZE = 64

    def __init__(self, tokenizer, token_bytes: TokenBytes, vocab_size: int, eos_ids: set[int]):
        self.tokenizer = tokenizer
        self.token_bytes = token_bytes
        self.vocab_size = vocab_size
        self.eos_ids = sorted(i for i in eos_ids if 0 <= i < vocab_size)
        self._ll_tokenizer = None
        self._executor = None
        self._compiled: OrderedDict[str, Any] = OrderedDict()
        self._shifts = torch.arange(32, dtype=torch.int32)

    def _tokenizer_for(self, field: str):
        if self._ll_tokenizer is None:
            llg = _llguidance(field)
            if not self.eos_ids:
                raise ConfigError(f"SamplingParams.{field} needs an end-of-sequence token to finish on; neither "
                                  "the model config (eos_token_id) nor the tokenizer defines one")
            view = _TokenizerView(self.tokenizer, self.token_bytes, self.vocab_size, self.eos_ids)
            self._ll_tokenizer = llg.LLTokenizer(llg.TokenizerWrapper(view), n_vocab=self.vocab_size,
                                                 eos_token=self.eos_ids)
        return self._ll_tokenizer

    def matchers(self, json_schema: dict | None, regex: str | None, count: int,
                 lark: str | None = None) -> list[Any]:
        """`count` fresh matchers for the constraint; ConfigError naming the field if it is invalid."""
        grammar = grammar_source(json_schema, regex, lark)
        field = constraint_field(json_schema, regex, lark)
        prototype = self._compiled.get(grammar)
        if prototype is None:
            llg = _llguidance(field)
            tokenizer = self._tokenizer_for(field)
            is_error, messages = llg.LLMatcher.validate_grammar_with_warnings(grammar, tokenizer)
            if is_error:
                value = {"json_schema": json_schema, "regex": regex, "grammar": lark}[field]
                raise ConfigError(f"SamplingParams.{field}={_short(value)} cannot be used: {_one_line(messages)}")
            prototype = llg.LLMatcher(tokenizer, grammar, log_level=0)
            if prototype.is_error():
                raise ConfigError(f"SamplingParams.{field}: {prototype.get_error()}")
            self._compiled[grammar] = prototype
            if len(self._compiled) > self.CACHE_SIZE:
                self._compiled.popitem(last=False)
        else:
            self._compiled.move_to_end(grammar)
        return [prototype.deep_copy() for _ in range(count)]

    def allowed(self, matchers: list[Any]) -> torch.Tensor:
        """bool [len(matchers), vocab]: True where a token may come next (computed in one native call)."""
        words = (self.vocab_size + 31) // 32
        bitmask = torch.zeros((len(matchers), words), dtype=torch.int32)  # CPU, contiguous: written natively
        if len(matchers) == 1:
            matchers[0].unsafe_compute_mask_ptr(bitmask.data_ptr(), words * 4)
        else:  # llguidance.torch's helpers do the same but import torch.compile (seconds) on first use
            if self._executor is None:
                self._executor = _llguidance("json_schema").LLExecutor()
            self._executor.unsafe_compute_mask_ptr([(m, i) for i, m in enumerate(matchers)], bitmask.data_ptr(),
                                                   words * 4, len(matchers))
        bits = (bitmask.unsqueeze(-1) >> self._shifts) & 1  # [k, words, 32]: bit j of word w = token 32w + j
        return bits.view(len(matchers), -1)[:, :self.vocab_size].bool()


def _one_line(messages: list[str]) -> str:
    """llguidance's error (a multi-line regex-parser report) as one line: its first line and the cause."""
    lines = [line.strip() for message in messages for line in message.splitlines() if line.strip()]
    kept = lines[:1] + [line for line in lines[1:] if line.startswith("error:")]
    return " ".join(kept) or "invalid grammar"


def _short(value: Any, limit: int = 120) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[:limit - 3] + "..."
