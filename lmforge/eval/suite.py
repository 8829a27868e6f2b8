"""What to evaluate: models (`ModelSpec`), tasks (`TaskSpec`) and the `lmforge eval` config that names them.

A suite (the OpenCompass way) is one YAML file naming several models — a base, its SFT, a LoRA adapter on
the base, a quantized copy — and the tasks with their data, shots and metrics; every model runs every task:

```yaml
models:
  - {name: base, path: runs/quickstart/pretrain/model}
  - {name: lora, path: runs/quickstart/pretrain/model, adapter: runs/quickstart/sft_lora/adapter, chat: true}
tasks:
  - {name: mc_en, type: mc, path: [tasks/mc_en_test.jsonl], dev_path: tasks/mc_en_train.jsonl, shots: 3}
  - {name: qa_zh, type: gen, path: [tasks/qa_zh_test.jsonl], metrics: [em, f1], perturbations: [typo]}
  - ppl                      # the `ppl:` section below
ppl: {path: [corpus/validation]}
```

On the command line the single-model form is `model=DIR [adapter=DIR] tasks=ppl,mc ppl.path=... mc.path=...`:
a task given by name is the section of that name (`ppl`, `mc`, `gen`, `code`) with its type filled in.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Optional

from ..config import build_config, opt
from ..core.errors import ConfigError

TASK_TYPES = ("ppl", "mc", "gen", "code")
DEFAULT_METRICS = {"ppl": ["perplexity", "bits_per_byte"], "mc": ["acc", "acc_norm"],
                   "gen": ["em", "f1", "bleu", "rouge_l"], "code": ["pass@1"]}


@dataclass
class ModelSpec:
    """One model to evaluate: a checkpoint directory, optionally with a PEFT adapter on top."""

    name: str = opt("", "label in results and reports (default: the adapter's or model's directory name)")
    path: str = opt("", "model directory (HF layout)")
    adapter: str = opt("", "PEFT adapter directory (LoRA, DoRA, IA3) loaded on top of path")
    tokenizer: str = opt("", "tokenizer directory (default: the adapter dir when it holds tokenizer.json, else path)")
    chat: bool = opt(False, "prompt with the chat template in tasks that leave `chat` unset (SFT/LoRA models)")
    dtype: str = opt("auto", "auto (float32 on CPU, bfloat16 on CUDA) | float32 | bfloat16 | float16")

    def validate(self) -> None:
        if not self.path:
            raise ConfigError("models[].path is empty: every model needs its directory")

    @property
    def label(self) -> str:
        return self.name or Path(self.adapter or self.path).name or self.path


@dataclass
class TaskSpec:
    """One task: its type, data and how it is prompted and scored (keys a type does not use are ignored)."""

    name: str = opt("", "label in results (default: the section name or the type)")
    type: str = opt("", "ppl | mc | gen | code (default: the section name)")
    path: list[str] = opt([], "data: ppl text files/dirs/globs or one shard directory; mc CSV/JSONL file or "
                              "task dir (MMLU/C-Eval/CMMLU layouts); gen/code JSONL files")
    split: str = opt("", "mc: split read under a task directory (default test); ppl shards: split (default val)")
    dev_path: str = opt("", "mc/gen: file or directory of k-shot exemplars (mc default: the dev split of path)")
    dev_split: str = opt("dev", "mc: split the exemplars come from when dev_path is empty")
    shots: int = opt(0, "mc/gen: number of exemplars in the prompt (mc: same subject, from dev)")
    scoring: Literal["letter", "text"] = opt("letter", "mc: score the option letters or the option texts")
    lang: Literal["auto", "en", "zh"] = opt("auto", "mc prompt language (auto: Chinese when the question has CJK)")
    chat: Optional[bool] = opt(None, "use the chat template (null: the model's `chat` setting)")
    extract: bool = opt(False, "mc: also let the model answer by generation and extract the letter (acc_gen)")
    metrics: list[str] = opt([], "gen: em, f1, bleu, rouge_l, contains (default: em, f1, bleu, rouge_l)")
    max_new_tokens: int = opt(32, "gen/code/extract: tokens generated per answer")
    stop: Optional[list[str]] = opt(None, "gen: stop strings (null: a newline for plain prompts, none for chat)")
    n: int = opt(1, "code: samples per problem")
    k: list[int] = opt([1], "code: the k of pass@k (each <= n)")
    temperature: float = opt(0.0, "code: sampling temperature (> 0 when n > 1)")
    top_p: float = opt(1.0, "code: nucleus sampling")
    max_length: Optional[int] = opt(None, "ppl/mc: window / longest input (null: the model's max_position_embeddings)")
    stride: Optional[int] = opt(None, "ppl: sliding-window stride (null: = max_length, independent chunks)")
    max_tokens: int = opt(0, "ppl shards: score at most this many tokens (0 = all)")
    text_field: str = opt("text", "ppl: JSONL/parquet field holding the text")
    limit: int = opt(0, "evaluate only the first N items (0 = all)")
    perturbations: list[str] = opt([], "robustness: typo, shuffle (mc only), paraphrase "
                                       "(default: robustness.perturbations)")
    on_error: Literal["raise", "skip"] = opt("raise", "a malformed data line: raise (file:line) or skip it")

    def resolved(self, section: str = "") -> "TaskSpec":
        """A copy with type, name, split and metrics filled from the section name and the type's defaults."""
        kind = self.type or section
        if kind not in TASK_TYPES:
            label = self.name or section or "(unnamed)"
            raise ConfigError(f"task {label}: type={kind!r} is not one of {list(TASK_TYPES)}")
        split = self.split or ("val" if kind == "ppl" else "test")
        metrics = list(self.metrics) or list(DEFAULT_METRICS[kind])
        if kind == "code" and not self.metrics:
            metrics = [f"pass@{k}" for k in self.k]
        task = dataclasses.replace(self, type=kind, name=self.name or section or kind, split=split, metrics=metrics)
        if not task.path:
            key = section or task.name
            raise ConfigError(f"task {task.name!r} has no data: set {key}.path (see `lmforge eval --help`)")
        if task.limit < 0 or task.shots < 0:
            raise ConfigError(f"task {task.name!r}: limit={task.limit} and shots={task.shots} must be >= 0")
        return task


@dataclass
class ContaminationSection:
    train: list[str] = opt([], "training data to check the eval sets against: text files/dirs/globs or shard dirs "
                               "(empty = no contamination check)")
    n: int = opt(13, "n-gram length (normalised words; each CJK character is one)")
    short_n: int = opt(8, "n-gram length for items shorter than n")
    max_docs: int = opt(0, "stop after this many training documents (0 = all)")
    tokenizer: str = opt("", "tokenizer that decodes shard directories (default: the first model's)")


@dataclass
class RobustnessSection:
    perturbations: list[str] = opt([], "perturbations applied to every mc/gen task that names none: typo, shuffle, "
                                       "paraphrase")
    typo_rate: float = opt(0.05, "share of a question's letters hit by a typo (at least one)")


@dataclass
class Config:
    model: str = opt("", "model directory (single-model form; a suite uses `models`)")
    adapter: str = opt("", "PEFT adapter directory on top of model")
    name: str = opt("", "label of the single model")
    chat: bool = opt(False, "single model: prompt through the chat template")
    models: list[Any] = opt([], "suite: a list of {name, path, adapter, tokenizer, chat, dtype}")
    tasks: list[Any] = opt([], "task names (ppl, mc, gen, code: the sections below) and/or full task mappings")
    ppl: TaskSpec = opt(TaskSpec, "the `ppl` task: perplexity and bits per byte of text files or shards")
    mc: TaskSpec = opt(TaskSpec, "the `mc` task: multiple choice by log-likelihood")
    gen: TaskSpec = opt(TaskSpec, "the `gen` task: generative QA (em, f1, bleu, rouge_l)")
    code: TaskSpec = opt(TaskSpec, "the `code` task: pass@k in the sandbox")
    contamination: ContaminationSection = opt(ContaminationSection,
                                              "n-gram overlap of the eval sets with training data")
    robustness: RobustnessSection = opt(RobustnessSection, "perturbed inputs and answer consistency")
    out_dir: str = opt("runs/eval", "results.json, report.md, report.html and predictions/ go here")
    overwrite: bool = opt(False, "replace results already in out_dir")
    seed: int = opt(0, "seed for sampling and perturbations (same seed, same numbers)")
    device: str = opt("auto", "auto | cpu | cuda | cuda:N")
    batch_size: int = opt(8, "rows per forward pass (log-likelihood, perplexity) / sequences decoded together")
    samples: int = opt(5, "predictions per task kept in results.json (all go to predictions/)")
    report: bool = opt(True, "write report.md and report.html")


def model_specs(cfg: Config) -> list[ModelSpec]:
    """The models of a config: the `models` list, or the single `model` (+ adapter)."""
    if cfg.models and cfg.model:
        raise ConfigError("set either model (one model) or models (a suite), not both")
    if cfg.models:
        specs = []
        for i, entry in enumerate(cfg.models):
            if isinstance(entry, str):
                entry = {"path": entry}
            if not isinstance(entry, dict):
                raise ConfigError(f"models[{i}]: expected a mapping with path (and name, adapter, chat), got {entry!r}")
            try:
                specs.append(build_config(ModelSpec, entry))
            except ConfigError as e:
                raise ConfigError(f"models[{i}]: {e}") from None
    elif cfg.model:
        specs = [ModelSpec(name=cfg.name, path=cfg.model, adapter=cfg.adapter, chat=cfg.chat)]
    else:
        raise ConfigError("no model to evaluate: pass --model DIR or a suite with models: [...]")
    labels = [s.label for s in specs]
    duplicate = next((x for x in labels if labels.count(x) > 1), None)
    if duplicate:
        raise ConfigError(f"two models are labelled {duplicate!r}: give each a distinct name")
    return specs


def task_specs(cfg: Config) -> list[TaskSpec]:
    """The tasks of a config, resolved: names pick the sections, mappings are full task definitions."""
    if not cfg.tasks:
        raise ConfigError("no tasks: pass tasks=ppl,mc,gen,code (with ppl.path=... etc.) or task mappings")
    out = []
    for i, entry in enumerate(cfg.tasks):
        if isinstance(entry, str):
            if entry not in TASK_TYPES:
                raise ConfigError(f"tasks[{i}]={entry!r} is not one of {list(TASK_TYPES)} (or a task mapping)")
            task = getattr(cfg, entry).resolved(entry)
        elif isinstance(entry, dict):
            try:
                task = build_config(TaskSpec, entry).resolved()
            except ConfigError as e:
                raise ConfigError(f"tasks[{i}]: {e}") from None
        else:
            raise ConfigError(f"tasks[{i}]: expected a task name or mapping, got {entry!r}")
        out.append(task)
    names = [t.name for t in out]
    duplicate = next((x for x in names if names.count(x) > 1), None)
    if duplicate:
        raise ConfigError(f"two tasks are named {duplicate!r}: give each a distinct name")
    return out


def with_default_perturbations(task: TaskSpec, perturbations: list[str]) -> TaskSpec:
    """An mc/gen task that names no perturbations gets the suite-wide ones (shuffle only for mc)."""
    from .robustness import check_perturbations

    if task.perturbations or task.type not in ("mc", "gen"):
        check_perturbations(task.perturbations, task.type)
        return task
    return dataclasses.replace(task, perturbations=[p for p in perturbations if p != "shuffle" or task.type == "mc"])
