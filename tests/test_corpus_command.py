"""`lmforge corpus`: the task sets describe the same world as the corpus they come with."""
from __future__ import annotations

import json

from lmforge.cli import main


def test_task_sets_use_the_corpus_world(tmp_path):
    out = tmp_path / "corpus"
    assert main(["corpus", f"out_dir={out}", "corpus.target_chars=20000", "corpus.world.num_people=6",
                 "corpus.world.num_cities=3", "corpus.world.num_countries=2", "corpus.world.num_companies=3",
                 "corpus.world.num_held_out_people=2"]) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    tasks = json.loads((out / "tasks" / "tasks.json").read_text())
    assert tasks["world"] == {k: v for k, v in manifest["world"].items() if k in tasks["world"]}
    assert tasks["world"]["people"] == 6 + 2
    names = "".join((out / "train" / f.name).read_text(encoding="utf-8") for f in (out / "train").glob("*.jsonl"))
    question = json.loads((out / "tasks" / "sft_train.jsonl").read_text(encoding="utf-8").splitlines()[0])
    subject = question["messages"][0]["content"]
    assert any(word in names for word in subject.replace("?", " ").split() if word[:1].isupper() and len(word) > 3)
