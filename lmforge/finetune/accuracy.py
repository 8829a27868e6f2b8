"""The measured gain of SFT: greedy answers to held-out questions, counted right when they contain the answer.

`fact_questions(world, facts)` turns the synthetic world's held-out facts into questions with their expected
object; `sft_accuracy(model, tokenizer, examples)` asks each through the chat template and `lmforge.infer`,
so the quickstart can report base vs SFT vs LoRA on the same questions.
"""
from __future__ import annotations

import random
from typing import Any, Sequence

import torch


def fact_questions(world, facts: Sequence, langs: Sequence[str] = ("en",), seed: int = 0) -> list[dict[str, Any]]:
    """[{"messages": [user question], "answer": the fact's object as text, "lang"}] for each fact and language."""
    from ..data.synthetic import text as T

    rng = random.Random(f"lmforge-sft-eval:{seed}")
    return [{"messages": [{"role": "user", "content": T.render_question(f, lang, rng)}],
             "answer": f.object_text(lang), "lang": lang}
            for f in facts for lang in langs]


def _prompt_and_answer(example: dict[str, Any]) -> tuple[list[dict], str]:
    """The messages to prompt with and the expected answer: the explicit "answer", else the reference reply
    (the last assistant message, dropped from the prompt)."""
    messages = list(example["messages"])
    if "answer" in example:
        if messages and messages[-1]["role"] == "assistant":
            messages = messages[:-1]
        return messages, str(example["answer"])
    if not messages or messages[-1]["role"] != "assistant":
        raise ValueError("an example needs an 'answer' field or a final assistant reply")
    return messages[:-1], messages[-1]["content"]


@torch.no_grad()
def sft_accuracy(model: torch.nn.Module, tokenizer, examples: Sequence[dict[str, Any]], max_new_tokens: int = 32,
                 batch_size: int = 16) -> dict[str, Any]:
    """{"accuracy", "correct", "total", "samples"}: greedy replies (chat template, generation prompt), one
    counted correct when it contains the expected answer (case-insensitive). Greedy, so it is deterministic."""
    from ..infer.generate import generate

    stops = [t for t in (tokenizer.token_to_id("<|im_end|>"), tokenizer.eos_id) if t is not None]
    correct, samples = 0, []
    for start in range(0, len(examples), batch_size):
        chunk = [_prompt_and_answer(e) for e in examples[start:start + batch_size]]
        prompts = [tokenizer.apply_chat_template(m, add_generation_prompt=True, tokenize=True) for m, _ in chunk]
        outputs = generate(model, prompts, max_new_tokens, temperature=0.0, eos_token_id=stops)
        for (messages, answer), ids in zip(chunk, outputs):
            reply = tokenizer.decode(ids, skip_special_tokens=True).strip()
            ok = answer.lower() in reply.lower()
            correct += ok
            if len(samples) < 5:
                samples.append({"question": messages[-1]["content"], "answer": answer, "reply": reply, "correct": ok})
    total = len(examples)
    return {"accuracy": correct / total if total else 0.0, "correct": correct, "total": total, "samples": samples}
