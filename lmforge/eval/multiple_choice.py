"""Multiple-choice accuracy by log-likelihood, with MMLU-style k-shot prompts (and chat prompts).

Each question becomes one context and one continuation per option; the model "answers" with the option
whose continuation it finds most likely (`acc`), or most likely per byte of the option (`acc_norm`, so long
options are not penalised for having more tokens; lm-eval divides by characters, `length_unit="chars"`
reproduces that). Two scorings:
- "letter" (MMLU's own): continuations " A", " B", ... after "Answer:"; all one byte, so acc_norm == acc.
- "text": continuations are the options' texts, for models too small to map letters to options.

Prompt (lm-eval's MMLU; Chinese follows CMMLU's wording and puts the letter straight after "答案："):

    The following are multiple choice questions (with answers) about high school physics.

    <exemplar question>
    A. ...
    B. ...
    Answer: B

    <question>
    A. ...
    Answer:

Exemplars are the first k dev questions of the same subject (never the question itself). With `chat=True`
the header becomes the system message, each exemplar a user/assistant turn and the question the last user
turn, rendered by the tokenizer's chat template with the generation prompt; the answer then follows the
assistant header directly, without the space.

Scores are reported per subject, micro-averaged over questions and macro-averaged over subjects.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal, Mapping, Sequence

from torch import nn

from .loglik import loglikelihood
from .metrics import has_cjk
from .tasks import MCQuestion

Scoring = Literal["letter", "text"]
PromptLang = Literal["en", "zh", "auto"]

HEADERS = {
    "en": "The following are multiple choice questions (with answers) about {subject}.\n\n",
    "zh": "以下是关于{subject}的单项选择题，请直接给出正确答案的选项。\n\n",
}
ANSWER_CUES = {"en": "Answer:", "zh": "答案："}
DELIMITERS = {"en": " ", "zh": ""}  # between the answer cue and the answer


def question_lang(question: MCQuestion, lang: PromptLang) -> str:
    """The prompt language for a question: as given, or "zh" when "auto" finds CJK characters in it."""
    if lang != "auto":
        return lang
    return "zh" if has_cjk(question.question + "".join(question.choices)) else "en"


def format_question(question: MCQuestion, lang: str) -> str:
    """The question, its lettered options and the answer cue (no answer)."""
    options = "".join(f"\n{letter}. {choice}" for letter, choice in zip(question.letters, question.choices))
    return f"{question.question.strip()}{options}\n{ANSWER_CUES[lang]}"


def answer_text(question: MCQuestion, index: int, scoring: Scoring) -> str:
    """What option `index` is scored as (without the delimiter): its letter or its text."""
    return question.letters[index] if scoring == "letter" else question.choices[index]


def header(subject: str, lang: str) -> str:
    """The task description line; empty for a question without a subject."""
    return HEADERS[lang].format(subject=subject.replace("_", " ")) if subject else ""


def pick_exemplars(question: MCQuestion, dev: Mapping[str, Sequence[MCQuestion]] | None, k: int) -> list[MCQuestion]:
    """The first k dev questions of the question's subject, leaving out the question itself."""
    if not k or not dev:
        return []
    pool = [q for q in dev.get(question.subject, ()) if (q.question, q.choices) != (question.question, question.choices)]
    return pool[:k]


def build_context(question: MCQuestion, exemplars: Sequence[MCQuestion], lang: str, scoring: Scoring = "letter",
                  chat_tokenizer: Any = None) -> str:
    """The prompt before the answer: plain k-shot text, or the chat-template rendering when a tokenizer is given."""
    if chat_tokenizer is None:
        shots = "".join(f"{format_question(s, lang)}{DELIMITERS[lang]}{answer_text(s, s.answer, scoring)}\n\n"
                        for s in exemplars)
        return header(question.subject, lang) + shots + format_question(question, lang)
    messages = []
    description = header(question.subject, lang).strip()
    if description:
        messages.append({"role": "system", "content": description})
    for s in exemplars:
        messages += [{"role": "user", "content": format_question(s, lang)},
                     {"role": "assistant", "content": answer_text(s, s.answer, scoring)}]
    messages.append({"role": "user", "content": format_question(question, lang)})
    return chat_tokenizer.apply_chat_template(messages, add_generation_prompt=True)


@dataclass
class MCPrediction:
    """The model's log-likelihood of each option and what it picked."""

    question: MCQuestion
    logprobs: list[float]
    lengths: list[int]  # each option's scored text in bytes (or chars): the acc_norm divisor
    num_shots: int = 0

    @property
    def pred(self) -> int:
        return max(range(len(self.logprobs)), key=lambda i: (self.logprobs[i], -i))  # ties: first, as np.argmax

    @property
    def pred_norm(self) -> int:
        scores = [lp / max(n, 1) for lp, n in zip(self.logprobs, self.lengths)]
        return max(range(len(scores)), key=lambda i: (scores[i], -i))

    @property
    def correct(self) -> bool:
        return self.pred == self.question.answer

    @property
    def correct_norm(self) -> bool:
        return self.pred_norm == self.question.answer


def summarize(predictions: Sequence[MCPrediction]) -> dict[str, Any]:
    """acc / acc_norm micro-averaged over questions, macro-averaged over subjects, and per subject."""
    subjects: dict[str, list[MCPrediction]] = {}
    for p in predictions:
        subjects.setdefault(p.question.subject, []).append(p)

    def rates(preds: Sequence[MCPrediction]) -> dict[str, float]:
        n = len(preds)
        return {"acc": sum(p.correct for p in preds) / n, "acc_norm": sum(p.correct_norm for p in preds) / n,
                "num_questions": n}

    per_subject = {name: rates(preds) for name, preds in sorted(subjects.items())}
    if not predictions:
        return {"acc": float("nan"), "acc_norm": float("nan"), "acc_macro": float("nan"),
                "acc_norm_macro": float("nan"), "num_questions": 0, "subjects": {}}
    micro = rates(predictions)
    return {
        "acc": micro["acc"], "acc_norm": micro["acc_norm"],
        "acc_macro": sum(s["acc"] for s in per_subject.values()) / len(per_subject),
        "acc_norm_macro": sum(s["acc_norm"] for s in per_subject.values()) / len(per_subject),
        "num_questions": len(predictions), "subjects": per_subject,
    }


@dataclass
class MCResult:
    """Per-question predictions and the summary metrics over them."""

    predictions: list[MCPrediction]
    metrics: dict[str, Any] = field(default_factory=dict)


def score_multiple_choice(
    model: nn.Module,
    tokenizer: Any,
    questions: Sequence[MCQuestion],
    dev: Mapping[str, Sequence[MCQuestion]] | None = None,
    *,
    num_shots: int = 0,
    scoring: Scoring = "letter",
    lang: PromptLang = "auto",
    chat: bool = False,
    batch_size: int = 8,
    length_unit: Literal["bytes", "chars"] = "bytes",
    max_length: int | None = None,
) -> MCResult:
    """Score every question by log-likelihood; all options of all questions go through one batched pass."""
    if scoring not in ("letter", "text"):
        raise ValueError(f"scoring={scoring!r} is not 'letter' or 'text'")
    if length_unit not in ("bytes", "chars"):
        raise ValueError(f"length_unit={length_unit!r} is not 'bytes' or 'chars'")
    if lang not in ("en", "zh", "auto"):
        raise ValueError(f"lang={lang!r} is not one of 'en', 'zh', 'auto'")
    requests: list[tuple[str, str]] = []
    shots_used: list[int] = []
    for q in questions:
        q_lang = question_lang(q, lang)
        exemplars = pick_exemplars(q, dev, num_shots)
        shots_used.append(len(exemplars))
        context = build_context(q, exemplars, q_lang, scoring, tokenizer if chat else None)
        delimiter = "" if chat else DELIMITERS[q_lang]
        requests += [(context, delimiter + answer_text(q, i, scoring)) for i in range(len(q.choices))]
    scores = loglikelihood(model, tokenizer, requests, batch_size=batch_size, max_length=max_length)

    predictions, at = [], 0
    for q, shots in zip(questions, shots_used):
        texts = [answer_text(q, i, scoring) for i in range(len(q.choices))]
        lengths = [len(t.encode("utf-8")) if length_unit == "bytes" else len(t) for t in texts]
        predictions.append(MCPrediction(q, [s.logprob for s in scores[at:at + len(texts)]], lengths, shots))
        at += len(texts)
    return MCResult(predictions, summarize(predictions))
