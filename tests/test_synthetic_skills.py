"""Instruction-following SFT tasks: disjoint splits, answers that are right by construction, deterministic."""
from __future__ import annotations

import json
import re

from lmforge.data.synthetic import make_world, split_facts
from lmforge.data.synthetic.skills import arithmetic_pairs, skill_examples


def test_skill_records_are_well_formed_and_correct():
    world = make_world(seed=1, num_people=12, num_cities=4, num_countries=2, num_companies=4, num_held_out_people=2)
    split = split_facts(world, seed=1)
    records = skill_examples(world, split.train, "train", seed=1)
    assert {r["category"] for r in records} == {"context_qa", "extract_json", "arithmetic"}
    assert {r["lang"] for r in records} == {"en", "zh"}
    for r in records:
        user, assistant = r["messages"]
        assert user["role"] == "user" and assistant["role"] == "assistant"
        assert assistant["content"] == r["answer"] and r["match"] == "exact"
        if r["category"] == "context_qa":
            assert r["answer"] in user["content"]  # answerable from the passage alone
        elif r["category"] == "extract_json":
            fact = json.loads(r["answer"])
            assert set(fact) == {"subject", "relation", "value"}
            assert fact["subject"] in user["content"] and fact["value"] in user["content"]
        else:
            a, b = map(int, re.findall(r"\d+", user["content"]))
            assert int(r["answer"]) == a + b
    assert skill_examples(world, split.train, "train", seed=1) == records  # deterministic


def test_arithmetic_splits_are_disjoint_and_mirror_closed():
    train, test = set(arithmetic_pairs("train", 0)), set(arithmetic_pairs("test", 0))
    assert not train & test and len(train | test) == 21 * 21
    assert 0.1 < len(test) / (len(train) + len(test)) < 0.3
    assert all((b, a) in test for a, b in test)
