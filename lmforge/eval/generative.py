"""Generative QA: read questions with reference answers, generate through the engine, score EM/F1/BLEU/ROUGE-L.

Data (JSONL, one item a line), any of:
- `{"prompt": "...", "answer": "..."}` or `{"prompt": ..., "references": [...]}` — a raw-text prompt;
- `{"messages": [...], "answer" | "references": ...}` — a conversation to continue;
- `{"messages": [..., {"role": "assistant", "content": ref}]}` — an SFT line: the last reply is the reference.
Optional `"subject"` and `"lang"` give per-subject scores and the EM/F1 language.

Prompts: with `chat=True` the messages (a prompt becomes one user message; k-shot exemplars become earlier
user/assistant turns) are rendered by the model's chat template with the generation prompt. Without chat a
raw `prompt` is used as is; messages become "Question: ...\\nAnswer:" blocks (问题：/答案： in Chinese),
exemplars first, and generation stops at the first newline.

All generation goes through `LLMEngine` (continuous batching): `batch_size` only sets how many sequences
decode together, and greedy decoding gives the same text whichever rows share a step (tested).
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

from ..core.errors import ConfigError, DataError
from .metrics import bleu, exact_match, has_cjk, rouge_l, token_f1

GEN_METRICS = ("em", "f1", "bleu", "rouge_l", "contains")
PLAIN_CUES = {"en": ("Question: ", "Answer:"), "zh": ("问题：", "答案：")}


@dataclass(frozen=True)
class GenItem:
    """One generative question: a raw prompt or a conversation, and its acceptable answers."""

    references: tuple[str, ...]
    prompt: str | None = None
    messages: tuple[dict, ...] = ()
    subject: str = ""
    lang: str = ""
    source: str = ""

    @property
    def question_text(self) -> str:
        """The text the question is asked with (the prompt, or the last user turn)."""
        if self.prompt is not None:
            return self.prompt
        users = [m["content"] for m in self.messages if m.get("role") == "user"]
        return users[-1] if users else ""

    @property
    def answer(self) -> str:
        return self.references[0]


def item_from_record(record: dict[str, Any], source: str = "") -> GenItem:
    """A GenItem from one JSON object (see the module docstring); ValueError saying what is missing."""
    messages = list(record.get("messages") or [])
    prompt = record.get("prompt")
    refs: Any = record.get("references", record.get("answer"))
    if refs is None:
        if not messages or messages[-1].get("role") != "assistant":
            raise ValueError("an item needs 'answer', 'references' or a final assistant reply")
        refs, messages = messages[-1]["content"], messages[:-1]
    elif messages and messages[-1].get("role") == "assistant":
        messages = messages[:-1]
    if isinstance(refs, (str, int, float)):
        refs = [str(refs)]
    if not isinstance(refs, list) or not refs or not all(isinstance(r, (str, int, float)) for r in refs):
        raise ValueError(f"references must be a non-empty list of strings, got {refs!r}")
    if prompt is None and not messages:
        raise ValueError("an item needs a 'prompt' or 'messages'")
    if prompt is not None and not isinstance(prompt, str):
        raise ValueError(f"prompt must be a string, got {type(prompt).__name__}")
    for m in messages:
        if not isinstance(m, dict) or not isinstance(m.get("content"), str) or "role" not in m:
            raise ValueError(f"a message needs 'role' and string 'content': {m!r}")
    return GenItem(tuple(str(r) for r in refs), prompt, tuple(dict(m) for m in messages),
                   str(record.get("subject", "")), str(record.get("lang", "")), source)


def read_gen_jsonl(path: str | Path, on_error: str = "raise") -> list[GenItem]:
    """Items of a generative-QA JSONL file; a bad line is a DataError naming file:line (or skipped)."""
    from ..data.readers import ReadStats, bad_line, iter_json_objects

    path, stats = Path(path), ReadStats()
    if not path.is_file():
        raise DataError(f"generative task file not found: {path}")
    items = []
    for line, record in iter_json_objects(path, on_error, stats):
        try:
            items.append(item_from_record(record, f"{path}:{line}"))
        except ValueError as e:
            bad_line(path, line, str(e), on_error, stats)
    return items


def item_lang(item: GenItem) -> str:
    """"zh" or "en": the item's own tag, else whether its question holds CJK characters."""
    if item.lang in ("en", "zh"):
        return item.lang
    return "zh" if has_cjk(item.question_text) else "en"


def _plain_block(item: GenItem, lang: str) -> str:
    question, answer = PLAIN_CUES[lang]
    return f"{question}{item.question_text.strip()}\n{answer}"


def prompt_text(item: GenItem, shots: Sequence[GenItem] = (), chat_tokenizer: Any = None) -> str:
    """The text the model continues: the chat rendering (when a tokenizer is given) or the plain k-shot text."""
    if chat_tokenizer is not None:
        messages: list[dict] = []
        for s in shots:
            messages += [{"role": "user", "content": s.question_text}, {"role": "assistant", "content": s.answer}]
        messages += list(item.messages) or [{"role": "user", "content": item.prompt or ""}]
        return chat_tokenizer.apply_chat_template(messages, add_generation_prompt=True)
    lang = item_lang(item)
    delimiter = " " if lang == "en" else ""
    head = "".join(f"{_plain_block(s, item_lang(s))}{delimiter}{s.answer}\n\n" for s in shots)
    if item.prompt is not None and not shots:
        return item.prompt
    return head + _plain_block(item, lang)


def prompt_ids(tokenizer: Any, text: str, chat: bool) -> list[int]:
    """Token ids of a prompt; plain text gets the BOS token when the tokenizer has a distinct one."""
    ids = tokenizer.encode(text)
    bos, eos = getattr(tokenizer, "bos_id", None), getattr(tokenizer, "eos_id", None)
    if not chat and bos is not None and bos != eos:
        ids = [bos] + ids
    return ids


def stop_token_ids(tokenizer: Any) -> list[int]:
    """EOS and the ChatML end-of-turn token, where the tokenizer has them."""
    ids = [getattr(tokenizer, "eos_id", None)]
    if hasattr(tokenizer, "token_to_id"):
        ids.append(tokenizer.token_to_id("<|im_end|>"))
    return sorted({i for i in ids if isinstance(i, int)})


@dataclass
class Generations:
    """Texts per prompt (n samples each) and the engine's counts and timings for them."""

    texts: list[list[str]]
    prompt_tokens: int = 0
    generated_tokens: int = 0
    ttft: list[float] = field(default_factory=list)
    tpot: list[float] = field(default_factory=list)


def make_engine(model: Any, tokenizer: Any, batch_size: int = 8, seed: int = 0, max_model_len: int | None = None):
    """An LLMEngine sized for evaluation: `batch_size` sequences decode together."""
    from ..infer import LLMEngine

    if batch_size < 1:
        raise ConfigError(f"batch_size={batch_size} must be >= 1")
    max_len = max_model_len or model.config.max_position_embeddings
    return LLMEngine(model, tokenizer, max_num_seqs=batch_size, max_num_batched_tokens=max(512, batch_size),
                     max_model_len=max_len, seed=seed)


def generate(engine: Any, prompts: Sequence[list[int]], params: Any) -> Generations:
    """Run every prompt through the engine (one SamplingParams, or one per prompt); a prompt longer than the
    engine allows keeps its last tokens."""
    per_prompt = list(params) if isinstance(params, (list, tuple)) else [params] * len(prompts)
    room = engine.max_model_len - max((p.max_tokens for p in per_prompt), default=0)
    if room < 1:
        raise ConfigError(f"max_new_tokens={per_prompt[0].max_tokens} leaves no room for a prompt within "
                          f"max_model_len={engine.max_model_len}")
    outputs = engine.generate([list(p)[-room:] for p in prompts], per_prompt)
    result = Generations([[c.text for c in sorted(o.outputs, key=lambda c: c.index)] for o in outputs])
    for o in outputs:
        result.prompt_tokens += len(o.prompt_token_ids)
        result.generated_tokens += o.metrics.num_generated_tokens
        if o.metrics.ttft is not None:
            result.ttft.append(o.metrics.ttft)
        if o.metrics.tpot is not None:
            result.tpot.append(o.metrics.tpot)
    return result


def clean_prediction(text: str, chat: bool) -> str:
    """The answer in a generation: stripped; a plain (non-chat) one ends at its first line."""
    text = text.strip()
    return text if chat else text.split("\n", 1)[0].strip()


def contains_answer(prediction: str, references: Sequence[str]) -> float:
    """1.0 when some reference appears in the prediction (case-insensitive): credit for a whole-sentence reply."""
    low = prediction.lower()
    return float(any(r.strip().lower() in low for r in references if r.strip()))


def score_predictions(predictions: Sequence[str], references: Sequence[Sequence[str]],
                      metrics: Iterable[str] = GEN_METRICS, lang: str = "auto") -> dict[str, float]:
    """Corpus-level scores: em, f1, contains (means over items, 0-1), bleu (0-100), rouge_l (0-1)."""
    metrics = list(metrics)
    unknown = [m for m in metrics if m not in GEN_METRICS]
    if unknown:
        raise ConfigError(f"unknown generative metric {unknown[0]!r}: choose from {list(GEN_METRICS)}")
    n = len(predictions)
    if n == 0:
        return {m: float("nan") for m in metrics}
    out: dict[str, float] = {}
    for m in metrics:
        if m == "em":
            out[m] = sum(exact_match(p, r, lang) for p, r in zip(predictions, references)) / n
        elif m == "f1":
            out[m] = sum(token_f1(p, r, lang) for p, r in zip(predictions, references)) / n
        elif m == "contains":
            out[m] = sum(contains_answer(p, r) for p, r in zip(predictions, references)) / n
        elif m == "bleu":
            out[m] = bleu(list(predictions), [list(r) for r in references], lang)
        else:
            out[m] = rouge_l(list(predictions), [list(r) for r in references], lang)
    return out


def item_correct(prediction: str, item: GenItem) -> bool:
    """Per-item correctness used by robustness and reports: exact match, or containment for chat replies."""
    return bool(exact_match(prediction, item.references) or contains_answer(prediction, item.references))


@dataclass
class GenResult:
    """Predictions per item and the scores over them (overall and per subject)."""

    predictions: list[str]
    metrics: dict[str, Any]
    generations: Generations


def evaluate_generative(model: Any, tokenizer: Any, items: Sequence[GenItem], *, shots: Sequence[GenItem] = (),
                        chat: bool = False, metrics: Iterable[str] = GEN_METRICS, max_new_tokens: int = 32,
                        batch_size: int = 8, stop: Sequence[str] | None = None, seed: int = 0,
                        engine: Any = None) -> GenResult:
    """Greedy answers to `items` through the engine, scored against their references (see module docstring)."""
    from ..infer import SamplingParams

    was_training = model.training  # the engine puts the model in eval mode; a caller mid-training gets it back
    engine = engine or make_engine(model, tokenizer, batch_size, seed)
    stop = list(stop) if stop is not None else ([] if chat else ["\n"])
    params = SamplingParams(temperature=0.0, max_tokens=max_new_tokens, stop=stop or None,
                            stop_token_ids=stop_token_ids(tokenizer))
    chat_tok = tokenizer if chat else None
    prompts = [prompt_ids(tokenizer, prompt_text(item, shots, chat_tok), chat) for item in items]
    try:
        generations = generate(engine, prompts, params)
    finally:
        model.train(was_training)
    predictions = [clean_prediction(texts[0], chat) for texts in generations.texts]
    metrics = list(metrics)
    scores: dict[str, Any] = score_predictions(predictions, [i.references for i in items], metrics)
    scores["num_items"] = len(items)
    subjects: dict[str, list[int]] = {}
    for index, item in enumerate(items):
        if item.subject:
            subjects.setdefault(item.subject, []).append(index)
    if len(subjects) > 1:
        scores["subjects"] = {
            name: {**score_predictions([predictions[i] for i in idx], [items[i].references for i in idx],
                                       [m for m in metrics if m != "bleu"]), "num_items": len(idx)}
            for name, idx in sorted(subjects.items())}
    return GenResult(predictions, scores, generations)


# ---- multiple choice answered by generation (chat models) ------------------------------------------------

_CUE_RE = re.compile(r"(?:answer\s*(?:is)?\s*[:：]?|答案\s*(?:是|为)?\s*[:：]?)\s*\(?([A-Z])\b", re.IGNORECASE)


def extract_choice(text: str, letters: str) -> int | None:
    """The option a generated reply picks: a letter after an answer cue ("Answer: B", "答案：B"), else the
    first standalone option letter; None when it names none of `letters`."""
    for match in _CUE_RE.finditer(text):
        letter = match.group(1).upper()
        if letter in letters:
            return letters.index(letter)
    for match in re.finditer(r"(?<![A-Za-z])([A-Z])(?![A-Za-z])", text):
        if match.group(1) in letters:
            return letters.index(match.group(1))
    return None
