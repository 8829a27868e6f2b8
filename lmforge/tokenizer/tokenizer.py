"""`Tokenizer`: a HF `tokenizers.Tokenizer` plus the special-token roles and chat template a model needs.

It reads and writes the Hugging Face tokenizer layout (tokenizer.json, tokenizer_config.json,
special_tokens_map.json, chat_template.jinja), so `transformers.AutoTokenizer.from_pretrained(dir)` loads
what we save and encodes, decodes and renders chats exactly as we do, and we load what transformers saves.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path
from typing import Any

from tokenizers import AddedToken
from tokenizers import Tokenizer as RustTokenizer

from ..core.errors import CheckpointError
from ..core.io import atomic_write_json, atomic_write_text
from .chat_template import (
    ChatTemplateError,
    Message,
    assistant_token_mask,
    render_chat,
    render_chat_with_assistant_spans,
    resolve_chat_template,
)

NAMED_SPECIAL_TOKENS = ("bos_token", "eos_token", "unk_token", "pad_token")


@dataclasses.dataclass
class ChatEncoding:
    """A conversation rendered and tokenized, with the loss mask SFT trains on."""

    text: str
    input_ids: list[int]
    assistant_mask: list[int]  # 1 where the token belongs to an assistant reply ({% generation %} block)


class Tokenizer:
    """Encode/decode text, render chats, and save/load in the Hugging Face layout."""

    def __init__(
        self,
        rust_tokenizer: RustTokenizer,
        bos_token: str | None = None,
        eos_token: str | None = None,
        pad_token: str | None = None,
        unk_token: str | None = None,
        chat_template: str | None = None,
        model_max_length: int | None = None,
    ) -> None:
        self.backend = rust_tokenizer
        self.bos_token = bos_token
        self.eos_token = eos_token
        self.pad_token = pad_token
        self.unk_token = unk_token
        self.chat_template = chat_template
        self.model_max_length = model_max_length

    # ---- loading and saving -------------------------------------------------------------------------------

    @classmethod
    def from_pretrained(cls, path: str | Path) -> Tokenizer:
        """The tokenizer saved in directory `path` (by us or by transformers)."""
        root = Path(path)
        if not root.is_dir():
            raise CheckpointError(f"tokenizer directory not found: {root}")
        tokenizer_file = root / "tokenizer.json"
        if not tokenizer_file.is_file():
            raise CheckpointError(
                f"{tokenizer_file} is missing: lmforge loads tokenizers in the HF `tokenizers` format (tokenizer.json)"
            )
        try:
            rust = RustTokenizer.from_file(str(tokenizer_file))
        except Exception as e:  # the Rust side raises a bare Exception for any parse error
            raise CheckpointError(f"{tokenizer_file} is not a valid tokenizer.json: {e}") from None
        config = _read_json_object(root / "tokenizer_config.json")
        special_map = _read_json_object(root / "special_tokens_map.json")
        roles = {key: _token_content(config.get(key, special_map.get(key))) for key in NAMED_SPECIAL_TOKENS}
        return cls(
            rust,
            chat_template=_read_chat_template(root, config),
            model_max_length=_as_int(config.get("model_max_length")),
            **roles,
        )

    def save_pretrained(self, path: str | Path) -> None:
        """Write tokenizer.json, tokenizer_config.json, special_tokens_map.json and chat_template.jinja to `path`.

        The template goes both to chat_template.jinja (what current transformers reads) and into
        tokenizer_config.json (what older transformers releases and llama.cpp's GGUF converter read)."""
        root = Path(path)
        root.mkdir(parents=True, exist_ok=True)
        added = self.backend.get_added_tokens_decoder()
        roles = {key: getattr(self, key) for key in NAMED_SPECIAL_TOKENS if getattr(self, key) is not None}
        additional = [t.content for _, t in sorted(added.items()) if t.special and t.content not in roles.values()]

        config: dict[str, Any] = {
            "added_tokens_decoder": {
                str(token_id): {
                    "content": token.content,
                    "lstrip": token.lstrip,
                    "normalized": token.normalized,
                    "rstrip": token.rstrip,
                    "single_word": token.single_word,
                    "special": token.special,
                }
                for token_id, token in sorted(added.items())
            },
            **roles,
            "additional_special_tokens": additional,
            # Our decoders already restore the text exactly; transformers' cleanup would turn " ." into ".".
            "clean_up_tokenization_spaces": False,
            "tokenizer_class": "PreTrainedTokenizerFast",
        }
        if self.model_max_length is not None:
            config["model_max_length"] = self.model_max_length
        if self.chat_template is not None:
            config["chat_template"] = self.chat_template

        atomic_write_text(root / "tokenizer.json", self.backend.to_str(pretty=True))
        atomic_write_json(root / "tokenizer_config.json", config)
        atomic_write_json(root / "special_tokens_map.json", {**roles, "additional_special_tokens": additional})
        if self.chat_template is not None:
            atomic_write_text(root / "chat_template.jinja", self.chat_template)
        else:  # a template left from an earlier save would be read back as this tokenizer's
            (root / "chat_template.jinja").unlink(missing_ok=True)

    def fingerprint(self) -> str:
        """Hex SHA-256 of the canonical tokenizer.json (key order and whitespace do not count).

        Data shards record it so training can refuse shards made with another tokenizer. Equal fingerprints
        mean equal ids; a tokenizer re-saved by transformers 5 differs (it adds a no-op post-processor)."""
        spec = json.loads(self.backend.to_str())
        canonical = json.dumps(spec, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
        return hashlib.sha256(canonical.encode("utf-8")).hexdigest()

    # ---- text <-> ids -------------------------------------------------------------------------------------

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        """Token ids of `text`; special tokens written in the text become their single ids.

        `add_special_tokens` runs the tokenizer's post-processor (e.g. a loaded Llama tokenizer's BOS);
        tokenizers trained by lmforge have none, so it changes nothing for them."""
        return self.backend.encode(text, add_special_tokens=add_special_tokens).ids

    def encode_batch(self, texts: list[str], add_special_tokens: bool = False) -> list[list[int]]:
        """Token ids of each text, encoded in parallel by the Rust encoder on all cores."""
        # encode_batch_fast skips computing offsets, which we do not return (tokenizers >= 0.21).
        encode = getattr(self.backend, "encode_batch_fast", self.backend.encode_batch)
        return [e.ids for e in encode(list(texts), add_special_tokens=add_special_tokens)]

    def decode(self, ids: list[int], skip_special_tokens: bool = False) -> str:
        """The text of `ids` (special tokens written out unless `skip_special_tokens`)."""
        return self.backend.decode(list(ids), skip_special_tokens=skip_special_tokens)

    @property
    def vocab_size(self) -> int:
        """Number of ids, added tokens included (the embedding table needs at least this many rows)."""
        return self.backend.get_vocab_size(with_added_tokens=True)

    def __len__(self) -> int:
        return self.vocab_size

    def token_to_id(self, token: str) -> int | None:
        return self.backend.token_to_id(token)

    def id_to_token(self, token_id: int) -> str | None:
        return self.backend.id_to_token(token_id)

    @property
    def bos_id(self) -> int | None:
        return None if self.bos_token is None else self.token_to_id(self.bos_token)

    @property
    def eos_id(self) -> int | None:
        return None if self.eos_token is None else self.token_to_id(self.eos_token)

    @property
    def pad_id(self) -> int | None:
        return None if self.pad_token is None else self.token_to_id(self.pad_token)

    @property
    def unk_id(self) -> int | None:
        return None if self.unk_token is None else self.token_to_id(self.unk_token)

    def add_tokens(self, tokens: list[str], special: bool = False) -> int:
        """Add whole tokens to the vocabulary (new ids at the end); returns how many were new.

        Special tokens are skipped by decode(skip_special_tokens=True); both kinds are matched before the
        model splits text, so each always encodes as its one id. Resize the model's embeddings afterwards."""
        # Same flags transformers uses, so a saved tokenizer behaves the same there.
        added = [AddedToken(t, special=special, normalized=not special) for t in tokens]
        if special:
            return self.backend.add_special_tokens(added)
        return self.backend.add_tokens(added)

    # ---- chat ---------------------------------------------------------------------------------------------

    def _template_variables(self, kwargs: dict[str, Any]) -> dict[str, Any]:
        # As transformers: templates see bos_token, eos_token, ... and the caller's kwargs override them.
        roles = {key: getattr(self, key) for key in NAMED_SPECIAL_TOKENS if getattr(self, key) is not None}
        return {**roles, **kwargs}

    def _template_source(self, chat_template: str | None) -> str:
        if chat_template is not None:
            return resolve_chat_template(chat_template)
        if self.chat_template is None:
            raise ChatTemplateError(
                "this tokenizer has no chat template: pass chat_template= (a built-in name or a Jinja string) "
                "or set tokenizer.chat_template"
            )
        return self.chat_template

    def apply_chat_template(
        self,
        messages: list[Message],
        add_generation_prompt: bool = False,
        tokenize: bool = False,
        tools: list[dict] | None = None,
        documents: list[dict] | None = None,
        chat_template: str | None = None,
        **kwargs: Any,
    ) -> str | list[int]:
        """The conversation rendered by the chat template: text, or its ids when `tokenize`.

        `tools` (JSON-schema dicts) and `documents` (RAG passages) go to templates that use them;
        `chat_template` overrides the tokenizer's own (a built-in name or Jinja); `kwargs` reach the template."""
        text = render_chat(
            self._template_source(chat_template), messages, add_generation_prompt=add_generation_prompt,
            tools=tools, documents=documents, **self._template_variables(kwargs),
        )
        return self.encode(text) if tokenize else text

    def encode_chat(
        self,
        messages: list[Message],
        add_generation_prompt: bool = False,
        tools: list[dict] | None = None,
        documents: list[dict] | None = None,
        chat_template: str | None = None,
        **kwargs: Any,
    ) -> ChatEncoding:
        """The conversation's ids with a per-token mask of the assistant replies (the template's
        `{% generation %}` blocks); a token counts if it overlaps a reply, as in transformers'
        `return_assistant_tokens_mask`. A template without generation blocks gives an all-zero mask."""
        text, spans = render_chat_with_assistant_spans(
            self._template_source(chat_template), messages, add_generation_prompt=add_generation_prompt,
            tools=tools, documents=documents, **self._template_variables(kwargs),
        )
        encoding = self.backend.encode(text, add_special_tokens=False)
        return ChatEncoding(text, encoding.ids, assistant_token_mask(encoding.offsets, spans))

    def __repr__(self) -> str:
        model = json.loads(self.backend.model.__getstate__())["type"]
        return f"Tokenizer({model}, vocab_size={self.vocab_size}, eos={self.eos_token!r})"


def _read_json_object(path: Path) -> dict[str, Any]:
    """The JSON object in `path`, or {} when the file is absent."""
    if not path.is_file():
        return {}
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path} is not valid JSON: {e}") from None
    if not isinstance(value, dict):
        raise CheckpointError(f"{path} must hold a JSON object, got {type(value).__name__}")
    return value


def _as_int(value: Any) -> int | None:
    # transformers writes "no limit" as 1e30, sometimes as a float.
    return int(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def _token_content(value: Any) -> str | None:
    # Special tokens are saved as plain strings or as AddedToken dicts ({"content": ..., "lstrip": ...}).
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


def _read_chat_template(root: Path, config: dict[str, Any]) -> str | None:
    """The chat template from chat_template.jinja, else from tokenizer_config.json (a string, or a list of
    named templates of which we take "default")."""
    jinja_file = root / "chat_template.jinja"
    if jinja_file.is_file():
        return jinja_file.read_text(encoding="utf-8")
    template = config.get("chat_template")
    if isinstance(template, list):
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default")
    return template if isinstance(template, str) else None
