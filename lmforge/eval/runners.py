"""One function per task type: load the task's data once, then score one loaded model on it.

Each runner returns a dict with `metrics` (headline numbers), optional `subjects` (per-subject breakdown),
`robustness`, `predictions` (one record per item, written to predictions/) and the token counts the
efficiency meter turns into rates. They are called by `harness.evaluate`, which times them.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from ..core.errors import DataError
from .suite import TaskSpec


@dataclass
class TaskData:
    """A task's items, read once and shared by every model."""

    task: TaskSpec
    items: list[Any] = field(default_factory=list)      # MCQuestion / GenItem / CodeProblem; ppl: none
    dev: Any = None                                     # mc: {subject: [MCQuestion]}, gen: [GenItem]

    def texts(self) -> list[str]:
        """Each item as plain text, for the contamination check (ppl: the documents themselves)."""
        kind = self.task.type
        if kind == "mc":
            return [q.question + "\n" + "\n".join(q.choices) for q in self.items]
        if kind == "gen":
            return [i.question_text + "\n" + i.answer for i in self.items]
        if kind == "code":
            return [p.prompt for p in self.items]
        return list(ppl_texts(self.task))


def _limit(items: list, task: TaskSpec) -> list:
    return items[:task.limit] if task.limit else items


def _files(task: TaskSpec) -> list[Path]:
    paths = [Path(p) for p in task.path]
    missing = [p for p in paths if not p.exists()]
    if missing:
        raise DataError(f"task {task.name!r}: {missing[0]} not found ({task.name}.path)")
    return paths


def load_task(task: TaskSpec) -> TaskData:
    """Read the task's data (and exemplars) according to its type."""
    if task.type == "mc":
        from .tasks import group_by_subject, load_mc_split, load_mc_task

        questions, dev = [], {}
        for root in _files(task):
            loaded = load_mc_task(root, task.split, None if task.dev_path else task.dev_split, on_error=task.on_error)
            questions += loaded.questions
            for subject, qs in loaded.dev.items():
                dev.setdefault(subject, []).extend(qs)
        if task.dev_path:
            dev = group_by_subject(load_mc_split(task.dev_path, task.dev_split if Path(task.dev_path).is_dir()
                                                 else "", on_error=task.on_error))
        return TaskData(task, _limit(questions, task), dev)
    if task.type == "gen":
        from .generative import read_gen_jsonl

        items = [i for p in _files(task) for i in read_gen_jsonl(p, task.on_error)]
        shots = read_gen_jsonl(task.dev_path, task.on_error)[:task.shots] if task.dev_path and task.shots else []
        return TaskData(task, _limit(items, task), shots)
    if task.type == "code":
        from .codegen import read_code_jsonl

        return TaskData(task, _limit([p for f in _files(task) for p in read_code_jsonl(f, task.on_error)], task))
    if not any(ch in "".join(task.path) for ch in "*?["):  # globs are resolved by the readers
        _files(task)
    return TaskData(task)


def _is_shard_dir(task: TaskSpec) -> bool:
    return len(task.path) == 1 and (Path(task.path[0]) / "meta.json").is_file()


def ppl_texts(task: TaskSpec):
    """The documents of a text-file perplexity task (shard tasks give none: their text is in token ids)."""
    if _is_shard_dir(task):
        return iter(())
    from ..data.config import SourceConfig
    from ..data.readers import read_source

    docs = (d.text for p in task.path for d in read_source(SourceConfig(path=p, text_field=task.text_field),
                                                            task.on_error))
    if task.limit:
        import itertools

        docs = itertools.islice(docs, task.limit)
    return docs


# ---- perplexity ----------------------------------------------------------------------------------------

def run_ppl(model: Any, tokenizer: Any, data: TaskData, batch_size: int) -> dict[str, Any]:
    from .perplexity import perplexity_of_shards, perplexity_of_texts

    task = data.task
    if _is_shard_dir(task):
        result = perplexity_of_shards(model, task.path[0], task.split, tokenizer, task.max_length, task.stride,
                                      batch_size, task.max_tokens or None)
    else:
        result = perplexity_of_texts(model, tokenizer, ppl_texts(task), task.max_length, task.stride, batch_size)
    metrics = result.to_dict()
    return {"metrics": metrics, "prompt_tokens": result.tokens, "requests": result.windows, "predictions": []}


# ---- multiple choice -----------------------------------------------------------------------------------

def _mc_predictions(questions: Sequence[Any], preds: Sequence[Any]) -> list[dict[str, Any]]:
    return [{"question": q.question, "choices": list(q.choices), "answer": q.answer_letter, "subject": q.subject,
             "pred": q.letters[p.pred], "pred_norm": q.letters[p.pred_norm],
             "logprobs": [round(x, 4) for x in p.logprobs]} for q, p in zip(questions, preds)]


def _score_mc(model: Any, tokenizer: Any, questions: Sequence[Any], dev: Any, task: TaskSpec, chat: bool,
              batch_size: int):
    from .multiple_choice import score_multiple_choice

    return score_multiple_choice(model, tokenizer, questions, dev, num_shots=task.shots, scoring=task.scoring,
                                 lang=task.lang, chat=chat, batch_size=batch_size, max_length=task.max_length)


def _mc_token_count(tokenizer: Any, questions: Sequence[Any], dev: Any, task: TaskSpec, chat: bool) -> int:
    """Tokens the model read: the distinct model inputs log-likelihood scoring builds (options whose input
    is identical, like the letters " A".." D" after one context, share one row)."""
    from .loglik import encode_pair
    from .multiple_choice import DELIMITERS, answer_text, build_context, pick_exemplars, question_lang

    rows: set[tuple[int, ...]] = set()
    for q in questions:
        lang = question_lang(q, task.lang)
        context = build_context(q, pick_exemplars(q, dev, task.shots), lang, task.scoring, tokenizer if chat else None)
        for i in range(len(q.choices)):
            option = ("" if chat else DELIMITERS[lang]) + answer_text(q, i, task.scoring)
            ctx, cont = encode_pair(tokenizer, context, option)
            rows.add(tuple(ctx + cont[:-1]))
    return sum(len(r) for r in rows)


def _mc_by_generation(model: Any, tokenizer: Any, data: TaskData, chat: bool, batch_size: int, seed: int,
                      engine: Any) -> tuple[dict[str, float], list[int | None], Any]:
    """acc_gen: the model writes its answer (chat template when chat) and the letter is extracted from it."""
    from ..infer import SamplingParams
    from .generative import extract_choice, generate, prompt_ids, stop_token_ids
    from .multiple_choice import build_context, pick_exemplars, question_lang

    task = data.task
    prompts = [prompt_ids(tokenizer, build_context(q, pick_exemplars(q, data.dev, task.shots),
                                                   question_lang(q, task.lang), "letter", tokenizer if chat else None),
                          chat) for q in data.items]
    params = SamplingParams(temperature=0.0, max_tokens=task.max_new_tokens, stop_token_ids=stop_token_ids(tokenizer))
    generations = generate(engine, prompts, params)
    picks = [extract_choice(texts[0], q.letters) for q, texts in zip(data.items, generations.texts)]
    n = max(len(picks), 1)
    metrics = {"acc_gen": sum(p == q.answer for p, q in zip(picks, data.items)) / n,
               "no_answer_rate": sum(p is None for p in picks) / n}
    return metrics, picks, generations


def run_mc(model: Any, tokenizer: Any, data: TaskData, chat: bool, batch_size: int, seed: int,
           engine_factory: Any) -> dict[str, Any]:
    task = data.task
    result = _score_mc(model, tokenizer, data.items, data.dev, task, chat, batch_size)
    metrics = {k: v for k, v in result.metrics.items() if k != "subjects"}
    out: dict[str, Any] = {"metrics": metrics, "subjects": result.metrics.get("subjects", {}),
                           "predictions": _mc_predictions(data.items, result.predictions),
                           "requests": len(data.items)}
    generated = 0
    if task.extract:
        gen_metrics, picks, generations = _mc_by_generation(model, tokenizer, data, chat, batch_size, seed,
                                                            engine_factory())
        metrics.update(gen_metrics)
        generated = generations.generated_tokens
        for record, q, texts, pick in zip(out["predictions"], data.items, generations.texts, picks):
            record.update(generation=texts[0], pred_gen=None if pick is None else q.letters[pick])
    out["prompt_tokens"] = _mc_token_count(tokenizer, data.items, data.dev, task, chat)
    out["generated_tokens"] = generated
    return out


def robust_mc(model: Any, tokenizer: Any, data: TaskData, chat: bool, batch_size: int, seed: int,
              typo_rate: float, original: dict[str, Any]) -> dict[str, Any]:
    """Accuracy under each perturbation and answer consistency; predictions are mapped back to original options."""
    from .robustness import perturb_mc, summarize_robustness

    task = data.task
    answers = [q.letters.index(r["pred"]) for q, r in zip(data.items, original["predictions"])]
    correct = [a == q.answer for a, q in zip(answers, data.items)]
    variants = {}
    for kind in task.perturbations:
        perturbed, orders = perturb_mc(data.items, kind, seed, typo_rate)
        scored = _score_mc(model, tokenizer, perturbed, data.dev, task, chat, batch_size)
        variants[kind] = ([order[p.pred] for order, p in zip(orders, scored.predictions)],
                          [p.correct for p in scored.predictions])
    return summarize_robustness(answers, correct, variants)


# ---- generative QA and code ----------------------------------------------------------------------------

def run_gen(model: Any, tokenizer: Any, data: TaskData, chat: bool, seed: int, engine_factory: Any) -> dict[str, Any]:
    from .generative import evaluate_generative, item_correct

    task = data.task
    engine = engine_factory()
    kwargs = dict(shots=data.dev or (), chat=chat, metrics=task.metrics, max_new_tokens=task.max_new_tokens,
                  stop=task.stop, seed=seed, engine=engine)
    result = evaluate_generative(model, tokenizer, data.items, **kwargs)
    metrics = {k: v for k, v in result.metrics.items() if k != "subjects"}
    out: dict[str, Any] = {
        "metrics": metrics, "subjects": result.metrics.get("subjects", {}),
        "predictions": [{"question": i.question_text, "references": list(i.references), "prediction": p,
                         "correct": item_correct(p, i)} for i, p in zip(data.items, result.predictions)],
        "prompt_tokens": result.generations.prompt_tokens, "generated_tokens": result.generations.generated_tokens,
        "requests": len(data.items), "ttft": result.generations.ttft, "tpot": result.generations.tpot}
    return out


def robust_gen(model: Any, tokenizer: Any, data: TaskData, chat: bool, seed: int, typo_rate: float,
               original: dict[str, Any], engine_factory: Any) -> dict[str, Any]:
    """Correctness under each perturbation and whether the normalised answer stays the same."""
    from .generative import evaluate_generative, item_correct
    from .robustness import normalized_text, perturb_gen, summarize_robustness

    task = data.task
    engine = engine_factory()
    variants = {}
    for kind in task.perturbations:
        scored = evaluate_generative(model, tokenizer, perturb_gen(data.items, kind, seed, typo_rate),
                                     shots=data.dev or (), chat=chat, metrics=["em"],
                                     max_new_tokens=task.max_new_tokens, stop=task.stop, seed=seed, engine=engine)
        variants[kind] = ([normalized_text(p) for p in scored.predictions],
                          [item_correct(p, i) for p, i in zip(scored.predictions, data.items)])
    return summarize_robustness([normalized_text(r["prediction"]) for r in original["predictions"]],
                                [r["correct"] for r in original["predictions"]], variants)


def run_code(model: Any, tokenizer: Any, data: TaskData, seed: int, engine_factory: Any) -> dict[str, Any]:
    from .codegen import evaluate_code

    task = data.task
    result = evaluate_code(model, tokenizer, data.items, n=task.n, ks=task.k, temperature=task.temperature,
                           top_p=task.top_p, max_new_tokens=task.max_new_tokens, seed=seed, engine=engine_factory())
    return {"metrics": result.metrics, "predictions": result.samples,
            "prompt_tokens": result.generations.prompt_tokens,
            "generated_tokens": result.generations.generated_tokens, "requests": len(data.items),
            "ttft": result.generations.ttft, "tpot": result.generations.tpot}
