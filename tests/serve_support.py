"""Shared pieces of the serve tests: a tiny tokenizer, a tiny random model, and a "scripted" model whose
greedy output is a text chosen by the test (so tool calls, stop strings and Chinese text can be checked
end to end through a real engine and a real server)."""
from __future__ import annotations

import random

import torch

from lmforge.infer.engine import LLMEngine
from lmforge.model import ModelConfig, Transformer
from lmforge.tokenizer import Tokenizer, TokenizerConfig, train_tokenizer

_WORDS = ["the", "cat", "sat", "on", "a", "mat", "weather", "in", "Paris", "is", "sunny", "today", "model",
          "server", "token", "stream", "hello", "world", "function", "call", "北京", "天气", "你好", "世界",
          "今天", "很好", "模型", "中文"]


def tiny_tokenizer() -> Tokenizer:
    rng = random.Random(0)
    lines = [" ".join(rng.choice(_WORDS) for _ in range(rng.randint(3, 12))) for _ in range(400)]
    return train_tokenizer(lines, TokenizerConfig(vocab_size=320, min_frequency=2))


def random_model(tokenizer: Tokenizer, max_len: int = 256) -> Transformer:
    torch.manual_seed(0)
    config = ModelConfig(vocab_size=tokenizer.vocab_size, hidden_size=32, intermediate_size=64, num_layers=2,
                         num_heads=4, num_kv_heads=2, max_position_embeddings=max_len, eos_token_id=None,
                         bos_token_id=None)
    model = Transformer(config).eval()
    with torch.no_grad():
        for param in model.parameters():
            param.normal_(0.0, 0.3)
    return model


class ScriptedModel(Transformer):
    """Greedy decoding writes `script` (token ids) right after a prompt of `prompt_len` tokens: position p's
    hidden state is the one-hot of p, and lm_head maps position prompt_len - 1 + i to script[i]."""

    def __init__(self, vocab_size: int, max_len: int, script: list[int], prompt_len: int):
        config = ModelConfig(vocab_size=vocab_size, hidden_size=max_len, intermediate_size=8, num_layers=1,
                             num_heads=1, num_kv_heads=1, head_dim=8, max_position_embeddings=max_len,
                             eos_token_id=None, bos_token_id=None)
        super().__init__(config)
        self.eval()
        with torch.no_grad():
            self.lm_head.weight.zero_()
            for i, token_id in enumerate(script):
                self.lm_head.weight[token_id, prompt_len - 1 + i] = 50.0

    def hidden_states(self, input_ids, *, position_ids=None, kv_cache=None, **_):
        if position_ids is None:
            position_ids = torch.arange(input_ids.shape[1]).unsqueeze(0)
        return torch.nn.functional.one_hot(position_ids, self.config.hidden_size).float()


def scripted_engine(tokenizer: Tokenizer, prompt_ids: list[int], text: str, max_len: int = 1024,
                    end_with_eos: bool = True) -> LLMEngine:
    script = tokenizer.encode(text) + ([tokenizer.eos_id] if end_with_eos else [])
    model = ScriptedModel(tokenizer.vocab_size, max_len, script, len(prompt_ids))
    return LLMEngine(model, tokenizer, max_num_seqs=4, block_size=8, max_num_batched_tokens=256)


def chat_prompt_ids(tokenizer: Tokenizer, messages: list[dict], tools: list[dict] | None = None) -> list[int]:
    """The prompt ids the server builds for these messages (through the server's own message builder)."""
    from lmforge.serve.protocol import ChatCompletionRequest
    from lmforge.serve.tools import build_messages

    request = ChatCompletionRequest(messages=messages, tools=tools)
    rendered, template_tools = build_messages(request, tokenizer.chat_template)
    return tokenizer.apply_chat_template(rendered, add_generation_prompt=True, tools=template_tools, tokenize=True)
