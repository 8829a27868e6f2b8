"""Chat with a model in the terminal: replies stream as they are generated, the conversation is kept.

    lmforge chat --model runs/quickstart/sft_full/model --system "You are concise."

Type a message and press Enter. `/reset` forgets the conversation, `/exit` (or Ctrl-D) quits; Ctrl-C stops
the reply being written. When the conversation outgrows the model's context, the oldest turns are dropped.
"""
from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Any, TextIO

from ..config import opt
from ..core.errors import ConfigError


@dataclass
class Config:
    model: str = opt("", "model directory (HF layout: config.json + safetensors + tokenizer with a chat template)")
    adapter: str = opt("", "PEFT adapter directory to load on the model (LoRA, DoRA, IA3, bottleneck; ours or peft's)")
    system: str = opt("", "system message put first in every conversation (empty: none)")
    max_tokens: int = opt(256, "most tokens per reply")
    temperature: float = opt(0.7, "0 = greedy; otherwise softmax temperature")
    top_p: float = opt(0.95, "nucleus sampling (1 = off)")
    top_k: int = opt(0, "keep the k most likely tokens (0 = off)")
    repetition_penalty: float = opt(1.1, "HF-style penalty on tokens already seen (1 = off)")
    seed: int = opt(0, "sampling seed")
    device: str = opt("auto", "auto | cpu | cuda")
    dtype: str = opt("auto", "auto (float32 on CPU, bfloat16 on CUDA) | float32 | bfloat16 | float16")


class ChatSession:
    """History + one engine; `reply(text, out)` streams the answer to `out` and returns it."""

    def __init__(self, engine, tokenizer, cfg: Config):
        self.engine = engine
        self.tokenizer = tokenizer
        self.cfg = cfg
        self.history: list[dict[str, str]] = []
        self.stop_ids = [i for i in (tokenizer.eos_id, tokenizer.token_to_id("<|im_end|>")) if i is not None]

    def reset(self) -> None:
        self.history = []

    def _prompt(self) -> list[int]:
        """The conversation's ids, dropping the oldest turns until a reply of max_tokens fits."""
        system = [{"role": "system", "content": self.cfg.system}] if self.cfg.system else []
        budget = self.engine.max_model_len - min(self.cfg.max_tokens, self.engine.max_model_len // 2)
        while True:
            ids = self.tokenizer.apply_chat_template(system + self.history, add_generation_prompt=True, tokenize=True)
            if len(ids) <= budget or len(self.history) <= 1:
                return ids[-budget:] if len(ids) > budget else ids
            self.history = self.history[2:] if len(self.history) > 2 else self.history[1:]

    def reply(self, text: str, out: TextIO) -> tuple[str, int]:
        from ..infer.request import SamplingParams

        self.history.append({"role": "user", "content": text})
        prompt = self._prompt()
        room = self.engine.max_model_len - len(prompt)
        params = SamplingParams(max_tokens=max(1, min(self.cfg.max_tokens, room)), temperature=self.cfg.temperature,
                                top_p=self.cfg.top_p, top_k=self.cfg.top_k, seed=self.cfg.seed,
                                repetition_penalty=self.cfg.repetition_penalty, stop_token_ids=self.stop_ids)
        request_id = self.engine.add_request(prompt, params)
        answer = ""
        try:
            while self.engine.has_unfinished_requests():
                for output in self.engine.step():
                    piece = output.outputs[0].new_text
                    answer += piece
                    out.write(piece)
                    out.flush()
        except KeyboardInterrupt:
            self.engine.abort(request_id)
            out.write(" [stopped]")
        out.write("\n")
        self.history.append({"role": "assistant", "content": answer})
        return answer, len(prompt)


def run(cfg: Config, stdin: TextIO | None = None, stdout: TextIO | None = None) -> list[dict[str, Any]]:
    """The chat loop; returns the transcript (user text, reply, prompt tokens per turn)."""
    from ..core.device import parse_dtype, pick_device
    from ..infer.engine import LLMEngine
    from ..infer.load import load_model_and_tokenizer

    if not cfg.model:
        raise ConfigError("model is empty: pass --model DIR")
    stdin, stdout = stdin or sys.stdin, stdout or sys.stdout
    device = pick_device(cfg.device)
    model, tokenizer = load_model_and_tokenizer(cfg.model, cfg.adapter or None, device=device,
                                                dtype=parse_dtype(cfg.dtype))
    if tokenizer.chat_template is None:
        raise ConfigError(f"{cfg.model} has no chat template; use `lmforge generate` for plain text")
    engine = LLMEngine(model, tokenizer, max_num_seqs=1, max_num_batched_tokens=512, seed=cfg.seed)
    session = ChatSession(engine, tokenizer, cfg)
    transcript: list[dict[str, Any]] = []
    stdout.write("lmforge chat: /reset forgets the conversation, /exit quits\n")
    while True:
        stdout.write("you> ")
        stdout.flush()
        line = stdin.readline()
        if not line:  # EOF (Ctrl-D)
            stdout.write("\n")
            break
        text = line.strip()
        if not text:
            continue
        if text == "/exit":
            break
        if text == "/reset":
            session.reset()
            stdout.write("[conversation reset]\n")
            continue
        stdout.write("assistant> ")
        answer, prompt_tokens = session.reply(text, stdout)
        transcript.append({"user": text, "reply": answer, "prompt_tokens": prompt_tokens})
    return transcript
