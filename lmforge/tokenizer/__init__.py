"""Tokenizers: train (byte-level BPE, BPE, Unigram, WordPiece), load/save in the HF layout, chat templates.

```python
from lmforge.tokenizer import TokenizerConfig, train_tokenizer, Tokenizer
tok = train_tokenizer(lines, TokenizerConfig(kind="byte_bpe", vocab_size=8192))
tok.save_pretrained("out/tokenizer")                 # transformers.AutoTokenizer loads this directory
tok = Tokenizer.from_pretrained("out/tokenizer")
chat = tok.encode_chat(messages)                     # input_ids + assistant_mask for SFT
```
"""
from .chat_template import (
    BUILTIN_TEMPLATES,
    ChatTemplateError,
    assistant_char_mask,
    assistant_token_mask,
    render_chat,
    render_chat_with_assistant_spans,
    resolve_chat_template,
)
from .tokenizer import ChatEncoding, Tokenizer
from .train import TokenizerConfig, train_tokenizer

__all__ = [
    "Tokenizer", "ChatEncoding", "TokenizerConfig", "train_tokenizer",
    "BUILTIN_TEMPLATES", "ChatTemplateError", "resolve_chat_template", "render_chat",
    "render_chat_with_assistant_spans", "assistant_char_mask", "assistant_token_mask",
]
