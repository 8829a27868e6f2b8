"""Pairwise arena: models answer a prompt set, an LLM judge (any OpenAI-compatible endpoint, position-swapped)
and/or human votes decide each battle, and Bradley–Terry / Elo ratings with bootstrap 95% intervals rank them.

    lmforge arena --config arena.yaml                 # models: a list of {name, path | base_url, ...}
    lmforge arena human_votes=votes.jsonl out_dir=runs/arena_votes      # rate human votes alone

arena.yaml:
    prompts: prompts.jsonl                            # {"id": "...", "prompt": "..."} per line
    models:
      - {name: base, path: runs/qs/pretrain/model}
      - {name: sft, path: runs/qs/pretrain/model, adapter: runs/qs/sft/adapter}
      - {name: remote, kind: openai, base_url: "http://127.0.0.1:8001/v1", model: served-name}
    judge: {base_url: "http://127.0.0.1:8000/v1", model: judge-model}

Outputs in out_dir: answers.jsonl, battles.jsonl, leaderboard.json, leaderboard.md; rerunning resumes.
"""
from __future__ import annotations

from ..eval.arena import ArenaConfig as Config
from ..eval.arena import ArenaResult, run_arena

__all__ = ["Config", "run"]


def run(cfg: Config) -> ArenaResult:
    result = run_arena(cfg)
    print(f"arena: {len(result.battles)} judged battles ({result.unjudged} without a verdict), "
          f"{result.human_votes} human votes -> {result.out_dir}/leaderboard.md")
    return result
