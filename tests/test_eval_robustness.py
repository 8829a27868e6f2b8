"""Robustness: seeded typos, option shuffling with the answer remapped, paraphrase templates, the consistency
summary pinned by hand, and a constructed model whose answer survives shuffling exactly as predicted."""
from __future__ import annotations

import random

import pytest

from lmforge.core.errors import ConfigError
from lmforge.eval.generative import GenItem
from lmforge.eval.robustness import (PARAPHRASES, add_typos, check_perturbations, paraphrase, perturb_gen, perturb_mc,
                                     shuffle_order, summarize_robustness)
from lmforge.eval.tasks import MCQuestion

QS = [MCQuestion(f"What colour is item {i}?", ("red", "blue", "green", "black"), i % 4, "colours") for i in range(12)]


def test_typos_are_seeded_small_and_leave_digits_alone():
    text = "What is the population of Greanholm in 2024?"
    a = add_typos(text, 0.1, random.Random(1))
    assert a == add_typos(text, 0.1, random.Random(1)) and a != text
    assert a != add_typos(text, 0.1, random.Random(2))
    assert "2024" in a and abs(len(a) - len(text)) <= 4
    zh = add_typos("萨里亚有多少人口？", 0.2, random.Random(0))
    assert zh != "萨里亚有多少人口？" and zh.endswith("？")
    assert add_typos("1234 ?!", 0.5, random.Random(0)) == "1234 ?!"  # nothing to hit
    with pytest.raises(ConfigError, match="typo_rate"):
        add_typos(text, 0.0, random.Random(0))


def test_shuffle_remaps_the_answer_and_never_keeps_the_order():
    perturbed, orders = perturb_mc(QS, "shuffle", seed=3)
    for q, p, order in zip(QS, perturbed, orders):
        assert order != [0, 1, 2, 3] and sorted(order) == [0, 1, 2, 3]
        assert p.choices[p.answer] == q.choices[q.answer]             # the same right option text
        assert [q.choices[i] for i in order] == list(p.choices)       # order[new] = original index
        assert p.question == q.question
    again, _ = perturb_mc(QS, "shuffle", seed=3)
    assert again == perturbed
    assert shuffle_order(1, random.Random(0)) == [0]


def test_paraphrase_and_typo_touch_only_the_question():
    for kind in ("typo", "paraphrase"):
        perturbed, orders = perturb_mc(QS, kind, seed=0)
        assert all(p.choices == q.choices and p.answer == q.answer for p, q in zip(perturbed, QS))
        assert all(o == [0, 1, 2, 3] for o in orders) and any(p.question != q.question for p, q in zip(perturbed, QS))
    text = paraphrase("中国的首都是哪里？", "zh", random.Random(0))
    assert any(text == t.format(q="中国的首都是哪里？") for t in PARAPHRASES["zh"])


def test_generative_perturbation_changes_prompt_or_last_user_turn():
    items = [GenItem(("4",), prompt="What is two plus two?"),
             GenItem(("Paris",), messages=({"role": "system", "content": "Be brief."},
                                           {"role": "user", "content": "What is the capital of France?"}))]
    typo = perturb_gen(items, "typo", seed=0, typo_rate=0.1)
    assert typo[0].prompt != items[0].prompt and typo[0].references == ("4",)
    assert typo[1].messages[0] == items[1].messages[0] and typo[1].messages[1]["content"] != items[1].messages[1]["content"]
    para = perturb_gen(items, "paraphrase", seed=0)
    assert "What is two plus two?" in para[0].prompt
    with pytest.raises(ConfigError, match="mc tasks"):
        perturb_gen(items, "shuffle")
    with pytest.raises(ConfigError, match="not one of"):
        check_perturbations(["rotate"], "mc")
    with pytest.raises(ConfigError, match="mc and gen tasks, not ppl"):
        check_perturbations(["typo"], "ppl")
    check_perturbations([], "code")


def test_summary_pinned_by_hand():
    original = [0, 1, 2, 3]
    correct = [True, True, False, False]
    variants = {"typo": ([0, 1, 1, 3], [True, True, False, False]),
                "shuffle": ([0, 2, 2, 3], [True, False, False, False])}
    s = summarize_robustness(original, correct, variants)
    assert s["accuracy"] == {"original": 0.5, "typo": 0.5, "shuffle": 0.25}
    assert s["drop"] == {"typo": 0.0, "shuffle": 0.25}
    assert s["consistency"] == 0.5            # items 0 and 3 keep their answer under both
    assert s["consistent_correct"] == 0.25    # only item 0 is right everywhere
    assert summarize_robustness([], [], {})["num_questions"] == 0


def test_constructed_model_prefers_one_option_text_through_shuffles():
    """A 'model' that always picks the option text 'green': under shuffling its answer is unchanged (consistency 1)
    and right exactly where green is the gold option (3 of 12 questions)."""
    from lmforge.eval.multiple_choice import MCPrediction

    def predict(questions):
        return [MCPrediction(q, [0.0 if c == "green" else -5.0 for c in q.choices], [1] * 4) for q in questions]

    base = predict(QS)
    perturbed, orders = perturb_mc(QS, "shuffle", seed=1)
    shuffled = predict(perturbed)
    s = summarize_robustness([p.pred for p in base], [p.correct for p in base],
                             {"shuffle": ([o[p.pred] for o, p in zip(orders, shuffled)], [p.correct for p in shuffled])})
    assert s["accuracy"] == {"original": 0.25, "shuffle": 0.25} and s["consistency"] == 1.0
    assert s["consistent_correct"] == 0.25
