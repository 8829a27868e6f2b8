"""The measured gain of SFT: greedy answers to held-out questions, counted right when they contain the answer.

`fact_questions(world, facts)` turns the synthetic world's held-out facts into questions with their expected
object; `sft_accuracy(model, tokenizer, examples)` asks each through the chat template and the engine (the
eval stage's generative QA, `lmforge.eval.generative`),
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


@torch.no_grad()
def sft_accuracy(model: torch.nn.Module, tokenizer, examples: Sequence[dict[str, Any]], max_new_tokens: int = 32,
                 batch_size: int = 16) -> dict[str, Any]:
    """{"accuracy", "correct", "total", "samples"}: greedy replies (chat template, generation prompt) through
    the eval stage's generative QA (`lmforge.eval.generative`, i.e. the engine), one counted correct when it
    contains the expected answer (case-insensitive). An example is {"messages", "answer"} or an SFT line whose
    last assistant reply is the reference. Greedy, so it is deterministic."""
    from ..eval.generative import contains_answer, evaluate_generative, item_from_record

    items = [item_from_record(e) for e in examples]
    result = evaluate_generative(model, tokenizer, items, chat=True, metrics=["contains"],
                                 max_new_tokens=max_new_tokens, batch_size=batch_size)
    correct, samples = 0, []
    for item, reply in zip(items, result.predictions):
        ok = bool(contains_answer(reply, [item.answer]))
        correct += ok
        if len(samples) < 5:
            samples.append({"question": item.question_text, "answer": item.answer, "reply": reply, "correct": ok})
    total = len(items)
    return {"accuracy": correct / total if total else 0.0, "correct": correct, "total": total, "samples": samples}
