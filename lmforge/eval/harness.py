"""`evaluate(models, tasks)`: every model on every task, with cost, robustness and contamination, into one dict.

```python
from lmforge.eval import evaluate, ModelSpec, TaskSpec
results = evaluate([ModelSpec(name="base", path="runs/qs/pretrain/model")],
                   [TaskSpec(type="mc", path=["tasks/mc_en_test.jsonl"], dev_path="tasks/mc_en_train.jsonl", shots=2)],
                   out_dir="runs/eval")
results["models"]["base"]["tasks"]["mc"]["metrics"]["acc"]
```

results.json layout: `models.<name>` = {path, adapter, num_params, load_seconds, tasks.<task> = {type,
metrics, subjects (mc/gen: per subject), robustness, efficiency (seconds, tokens/s, peak memory), samples}},
`contamination.<task>`, `tasks.<task>` (the resolved spec), `config`, `seed`, `environment`, `timings`.
Each task starts from `seed_everything(seed)`, so the same seed gives the same numbers; every prediction goes
to `predictions/<model>/<task>.jsonl`.
"""
from __future__ import annotations

import dataclasses
import json
import platform
import re
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Sequence

from ..core.errors import ConfigError
from ..core.io import atomic_write_json, atomic_write_text
from .suite import ContaminationSection, ModelSpec, RobustnessSection, TaskSpec, with_default_perturbations

RESULTS_FORMAT = "lmforge-eval/1"


def load_model(spec: ModelSpec, device: Any):
    """(model, tokenizer) for a spec: the checkpoint, its adapter on top, and the right tokenizer."""
    from ..core.device import parse_dtype
    from ..infer.load import load_model_and_tokenizer

    return load_model_and_tokenizer(spec.path, spec.adapter, spec.tokenizer, device, parse_dtype(spec.dtype))


def safe_name(name: str) -> str:
    """A label as a file name: anything but letters, digits, '.', '_' and '-' becomes '_'."""
    return re.sub(r"[^A-Za-z0-9._-]", "_", name).strip(".") or "_"


def _environment(device: Any) -> dict[str, Any]:
    import torch

    env = {"torch": torch.__version__, "python": platform.python_version(), "device": str(device),
           "threads": torch.get_num_threads(), "machine": platform.machine()}
    if device.type == "cuda":
        env["gpu"] = torch.cuda.get_device_name(device)
    return env


def _run_task(model: Any, tokenizer: Any, data: Any, spec: ModelSpec, *, device: Any, batch_size: int, seed: int,
              typo_rate: float) -> dict[str, Any]:
    """One model on one task, timed; returns the task's entry of results.json (predictions under `_all`)."""
    from ..core.seed import seed_everything
    from . import runners
    from .efficiency import Meter
    from .generative import make_engine

    task = data.task
    chat = spec.chat if task.chat is None else task.chat
    engine: Callable[[], Any] = lambda: make_engine(model, tokenizer, batch_size, seed)  # noqa: E731
    seed_everything(seed)
    with Meter(device) as meter:
        if task.type == "ppl":
            out = runners.run_ppl(model, tokenizer, data, batch_size)
        elif task.type == "mc":
            out = runners.run_mc(model, tokenizer, data, chat, batch_size, seed, engine)
        elif task.type == "gen":
            out = runners.run_gen(model, tokenizer, data, chat, seed, engine)
        else:
            out = runners.run_code(model, tokenizer, data, seed, engine)
    if task.perturbations and task.type == "mc":  # after the meter: cost is that of the plain task
        out["robustness"] = runners.robust_mc(model, tokenizer, data, chat, batch_size, seed, typo_rate, out)
    elif task.perturbations and task.type == "gen":
        out["robustness"] = runners.robust_gen(model, tokenizer, data, chat, seed, typo_rate, out, engine)
    eff = meter.result
    eff.prompt_tokens, eff.generated_tokens = int(out.get("prompt_tokens", 0)), int(out.get("generated_tokens", 0))
    eff.requests, eff.ttft, eff.tpot = int(out.get("requests", 0)), out.get("ttft", []), out.get("tpot", [])
    entry = {"type": task.type, "chat": chat, "metrics": out["metrics"], "efficiency": eff.to_dict()}
    for key in ("subjects", "robustness"):
        if out.get(key):
            entry[key] = out[key]
    entry["_all"] = out.get("predictions", [])
    return entry


def _contamination(datasets: Sequence[Any], section: ContaminationSection, tokenizer_dir: str) -> dict[str, Any]:
    from ..tokenizer import Tokenizer
    from .contamination import check_contamination

    tokenizer = Tokenizer.from_pretrained(section.tokenizer or tokenizer_dir)
    return check_contamination({d.task.name: d.texts() for d in datasets}, section.train, tokenizer,
                               section.n, section.short_n, section.max_docs)


def _prepare_out_dir(out_dir: Path, overwrite: bool) -> None:
    if (out_dir / "results.json").exists() and not overwrite:
        raise ConfigError(f"{out_dir / 'results.json'} exists: pass overwrite=true or another out_dir")


def evaluate(models: Sequence[ModelSpec], tasks: Sequence[TaskSpec], *, out_dir: str | Path | None = None,
             seed: int = 0, device: str = "auto", batch_size: int = 8, samples: int = 5,
             contamination: ContaminationSection | None = None, robustness: RobustnessSection | None = None,
             report: bool = True, overwrite: bool = False, config: dict[str, Any] | None = None,
             log: Callable[[str], None] = print) -> dict[str, Any]:
    """Evaluate every model on every task (see the module docstring); writes results when out_dir is given."""
    from ..core.device import pick_device
    from .runners import load_task

    if not models or not tasks:
        raise ConfigError("evaluate needs at least one model and one task")
    if batch_size < 1:
        raise ConfigError(f"batch_size={batch_size} must be >= 1")
    robustness = robustness or RobustnessSection()
    tasks = [with_default_perturbations(t.resolved(), robustness.perturbations) for t in tasks]
    out = Path(out_dir) if out_dir is not None else None
    if out is not None:
        _prepare_out_dir(out, overwrite)
    started = time.perf_counter()
    torch_device = pick_device(device)
    datasets = [load_task(t) for t in tasks]
    results: dict[str, Any] = {
        "format": RESULTS_FORMAT, "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "seed": seed, "batch_size": batch_size, "config": config or {},
        "tasks": {t.name: dataclasses.asdict(t) for t in tasks}, "models": {}, "timings": {},
        "environment": _environment(torch_device)}
    predictions: dict[tuple[str, str], list] = {}
    for spec in models:
        t0 = time.perf_counter()
        model, tokenizer = load_model(spec, torch_device)
        entry: dict[str, Any] = {"path": spec.path, "adapter": spec.adapter, "chat": spec.chat,
                                 "num_params": sum(p.numel() for p in model.parameters()),
                                 "dtype": str(next(model.parameters()).dtype).replace("torch.", ""),
                                 "load_seconds": time.perf_counter() - t0, "tasks": {}}
        for data in datasets:
            task_entry = _run_task(model, tokenizer, data, spec, device=torch_device, batch_size=batch_size,
                                   seed=seed, typo_rate=robustness.typo_rate)
            predictions[(spec.label, data.task.name)] = task_entry.pop("_all")
            task_entry["samples"] = predictions[(spec.label, data.task.name)][:samples]
            entry["tasks"][data.task.name] = task_entry
            log(f"[eval] {spec.label} / {data.task.name}: " + ", ".join(
                f"{k}={v:.4g}" for k, v in task_entry["metrics"].items() if isinstance(v, float)))
        results["models"][spec.label] = entry
        results["timings"][spec.label] = time.perf_counter() - t0
        del model
    if contamination is not None and contamination.train:
        t0 = time.perf_counter()
        first = models[0]
        tok_dir = first.tokenizer or (first.adapter if first.adapter and (Path(first.adapter) / "tokenizer.json")
                                      .is_file() else first.path)
        results["contamination"] = _contamination(datasets, contamination, tok_dir)
        results["timings"]["contamination"] = time.perf_counter() - t0
    results["timings"]["total"] = time.perf_counter() - started
    if out is not None:
        write_outputs(out, results, predictions, report)
    return results


def write_outputs(out: Path, results: dict[str, Any], predictions: dict[tuple[str, str], list], report: bool) -> None:
    """results.json, predictions/<model>/<task>.jsonl and (optionally) report.md + report.html, all atomic."""
    for (model_name, task_name), records in predictions.items():
        atomic_write_text(out / "predictions" / safe_name(model_name) / f"{safe_name(task_name)}.jsonl",
                          "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
    atomic_write_json(out / "results.json", results)
    if report:
        from .report import write_reports

        write_reports(results, out)
