"""Robustness (鲁棒性评测): the same questions asked slightly differently, and how much the answers move.

Perturbations, each seeded per question so a rerun asks exactly the same variants:
- `typo`: character noise in the question — adjacent swap, deletion, doubling or a random same-script
  letter — at `rate` of its letters (at least one); digits, punctuation and option texts are left alone,
  so the question keeps its meaning and its answer.
- `shuffle`: the options in another order (multiple choice only); the gold index is remapped and every
  prediction is mapped back to the original option before predictions are compared.
- `paraphrase`: the question wrapped in one of several instruction templates ("Please answer the
  following question. ..." / "请回答下面的问题。...").

Reported per task: accuracy on the original and under each perturbation, the drop, `consistency` (share of
questions whose answer — the chosen option, or the normalised generated text — is the same under every
perturbation as on the original), and `consistent_correct` (share right on the original and every variant).
"""
from __future__ import annotations

import random
import string
from dataclasses import replace
from typing import Sequence

from ..core.errors import ConfigError
from .generative import GenItem, item_lang
from .metrics import has_cjk, normalize_answer
from .tasks import MCQuestion

PERTURBATIONS = ("typo", "shuffle", "paraphrase")
PARAPHRASES = {
    "en": ("Question: {q}", "Please answer the following question. {q}", "{q} Give the correct answer.",
           "Here is a question for you: {q}"),
    "zh": ("问题：{q}", "请回答下面的问题。{q}", "{q}请给出正确答案。", "这里有一个问题：{q}"),
}
# common Han characters a Chinese typo substitutes (a wrong character of the same script)
_CJK_POOL = ("的一是在不了有和人这中大为上个国我以要他时来用们生到作地于出就分对成会可主发年动同工也能下过子说产种"
             "面而方后多定行学法所民得经十三之进着等部度家电力里如水化高自二理起小物现实加量都两体制机当使点从业本"
             "去把性好应开它合还因由其些然前外天政四日那社义事平形相全表间样与关各重新线内数正心反你明看原又么利比"
             "或但质气第向道命此变条只没结解问意建月公无系军很情者最立代想已通并提直题党程展五果料象员革位入常文总"
             "次品式活设及管特件长求老头基资边流路级少图山统接知较将组见计别她手角期根论运农指几九区强放决西被干做"
             "必战先回则任取据处府研")


def _check_rate(rate: float) -> None:
    if not 0.0 < rate <= 1.0:
        raise ConfigError(f"robustness.typo_rate={rate} must be in (0, 1]")


def add_typos(text: str, rate: float, rng: random.Random) -> str:
    """`text` with character typos at about `rate` of its letters (at least one when it has letters)."""
    _check_rate(rate)
    chars = list(text)
    letters = [i for i, c in enumerate(chars) if c.isalpha()]
    if not letters:
        return text
    count = max(1, round(len(letters) * rate))
    for i in sorted(rng.sample(letters, min(count, len(letters))), reverse=True):  # right to left: indices stay valid
        c = chars[i]
        op = rng.choice(("swap", "delete", "double", "replace"))
        if op == "swap" and i + 1 < len(chars) and chars[i + 1].isalpha() and chars[i + 1] != c:
            chars[i], chars[i + 1] = chars[i + 1], c
        elif op == "delete" and len(letters) > 1:
            del chars[i]
        elif op == "double":
            chars.insert(i, c)
        else:
            pool = _CJK_POOL if has_cjk(c) else string.ascii_lowercase
            new = rng.choice([p for p in pool if p != c.lower()])
            chars[i] = new.upper() if c.isupper() else new
    return "".join(chars)


def paraphrase(text: str, lang: str, rng: random.Random) -> str:
    """The question inside a randomly chosen instruction template of its language."""
    return rng.choice(PARAPHRASES["zh" if lang == "zh" else "en"]).format(q=text.strip())


def _rng(seed: int, kind: str, index: int) -> random.Random:
    return random.Random(f"lmforge-robust:{seed}:{kind}:{index}")


def check_perturbations(kinds: Sequence[str], task_type: str) -> None:
    """ConfigError naming the first perturbation that does not exist or does not fit the task type."""
    if kinds and task_type not in ("mc", "gen"):
        raise ConfigError(f"perturbations {list(kinds)} apply to mc and gen tasks, not {task_type}")
    for kind in kinds:
        if kind not in PERTURBATIONS:
            raise ConfigError(f"perturbation {kind!r} is not one of {list(PERTURBATIONS)}")
        if kind == "shuffle" and task_type != "mc":
            raise ConfigError(f"perturbation 'shuffle' reorders options: it applies to mc tasks, not {task_type}")


def shuffle_order(num_choices: int, rng: random.Random) -> list[int]:
    """A permutation of the options that differs from the original order (when there are >= 2)."""
    order = list(range(num_choices))
    if num_choices < 2:
        return order
    while order == list(range(num_choices)):
        rng.shuffle(order)
    return order


def perturb_mc(questions: Sequence[MCQuestion], kind: str, seed: int = 0, typo_rate: float = 0.05
               ) -> tuple[list[MCQuestion], list[list[int]]]:
    """Perturbed questions and, per question, `order` with order[new index] = original index."""
    check_perturbations([kind], "mc")
    out, orders = [], []
    for index, q in enumerate(questions):
        rng = _rng(seed, kind, index)
        order = list(range(len(q.choices)))
        if kind == "typo":
            q = replace(q, question=add_typos(q.question, typo_rate, rng))
        elif kind == "paraphrase":
            q = replace(q, question=paraphrase(q.question, "zh" if has_cjk(q.question) else "en", rng))
        else:
            order = shuffle_order(len(q.choices), rng)
            q = replace(q, choices=tuple(q.choices[i] for i in order), answer=order.index(q.answer))
        out.append(q)
        orders.append(order)
    return out, orders


def perturb_gen(items: Sequence[GenItem], kind: str, seed: int = 0, typo_rate: float = 0.05) -> list[GenItem]:
    """Perturbed generative items: the question text (raw prompt, or last user turn) is changed."""
    check_perturbations([kind], "gen")
    out = []
    for index, item in enumerate(items):
        rng = _rng(seed, kind, index)
        text = item.question_text
        new = add_typos(text, typo_rate, rng) if kind == "typo" else paraphrase(text, item_lang(item), rng)
        if item.prompt is not None:
            out.append(replace(item, prompt=new))
            continue
        messages = list(item.messages)
        last_user = max(i for i, m in enumerate(messages) if m.get("role") == "user")
        messages[last_user] = {**messages[last_user], "content": new}
        out.append(replace(item, messages=tuple(messages)))
    return out


def summarize_robustness(original_answers: Sequence, original_correct: Sequence[bool],
                         variants: dict[str, tuple[Sequence, Sequence[bool]]]) -> dict:
    """Accuracy per variant, its drop from the original, consistency and consistent_correct (see docstring).

    Answers must be comparable across variants: original option indices for MC, normalised texts for gen."""
    n = len(original_answers)
    if n == 0:
        return {"accuracy": {}, "drop": {}, "consistency": float("nan"), "consistent_correct": float("nan"),
                "num_questions": 0}
    accuracy = {"original": sum(original_correct) / n}
    for name, (_, correct) in variants.items():
        accuracy[name] = sum(correct) / n
    unchanged = [all(answers[i] == original_answers[i] for answers, _ in variants.values()) for i in range(n)]
    stable_right = [original_correct[i] and all(c[i] for _, c in variants.values()) for i in range(n)]
    return {"accuracy": accuracy, "drop": {k: accuracy["original"] - v for k, v in accuracy.items() if k != "original"},
            "consistency": sum(unchanged) / n, "consistent_correct": sum(stable_right) / n, "num_questions": n}


def normalized_text(prediction: str) -> str:
    """A generated answer as compared across variants: SQuAD-normalised (CJK-aware)."""
    return normalize_answer(prediction, "auto")
