"""The quickstart's later stages: fine-tune (full SFT and LoRA), evaluate side by side, serve and query.

Each runs from a recipe (recipes/quickstart/sft.yaml, recipes/suites/quickstart.yaml) with the paths moved
under the quickstart's out_dir, so `lmforge finetune --config ...` / `lmforge eval --config ...` rerun it.
"""
from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable

import yaml

from ..config import build_config

RECIPES = Path(__file__).resolve().parent.parent / "recipes"


def load_recipe(relative: str, out_dir: str, cls: type, overrides: list[str] | None = None):
    """recipes/<relative> with its runs/quickstart paths moved under out_dir."""
    text = (RECIPES / relative).read_text(encoding="utf-8").replace("runs/quickstart", out_dir.rstrip("/"))
    return build_config(cls, yaml.safe_load(text) or {}, overrides)


def finetune_stage(out_dir: str, common: list[str], steps: int) -> dict[str, dict[str, Any]]:
    """Full SFT and LoRA from the same recipe and data; {"full": summary, "lora": summary}."""
    from ..finetune import Config as FinetuneConfig
    from ..finetune import run as finetune

    runs = {"full": ["finetune.method=full", "train.lr=3e-4", f"train.out_dir={out_dir}/sft_full"],
            "lora": ["finetune.method=lora", f"train.out_dir={out_dir}/sft_lora"]}
    summaries = {}
    for name, overrides in runs.items():
        extra = [f"train.max_steps={steps}"] if steps else []
        print(f"--- {name} ---", flush=True)
        summaries[name] = finetune(load_recipe("quickstart/sft.yaml", out_dir, FinetuneConfig,
                                               [*overrides, *common, *extra]))
    return summaries


def eval_stage(out_dir: str, device: str, limit: int = 0) -> dict[str, Any]:
    """Base vs full SFT vs LoRA on held-out multiple choice and QA (recipes/suites/quickstart.yaml)."""
    from ..eval import evaluate
    from ..eval.suite import Config as SuiteConfig
    from ..eval.suite import model_specs, task_specs

    overrides = [f"device={device}"] if device != "auto" else []
    cfg = load_recipe("suites/quickstart.yaml", out_dir, SuiteConfig, overrides)
    tasks = task_specs(cfg)
    if limit:
        import dataclasses

        tasks = [dataclasses.replace(t, limit=min(t.limit or limit, limit)) for t in tasks]
    return evaluate(model_specs(cfg), tasks, out_dir=cfg.out_dir, seed=cfg.seed, device=cfg.device,
                    batch_size=cfg.batch_size, contamination=cfg.contamination, robustness=cfg.robustness,
                    overwrite=True, config={"suite": "recipes/suites/quickstart.yaml"})


def serve_stage(model_dir: str, question: str, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Start `lmforge serve` as a real subprocess, ask one chat question with the official openai client
    (streamed, to time the first token), read /metrics, and stop the server with Ctrl-C (it drains)."""
    from openai import OpenAI

    from ..serve.server import free_port, wait_healthy

    port = free_port()
    url = f"http://127.0.0.1:{port}"
    cmd = [sys.executable, "-m", "lmforge", "serve", f"model={model_dir}", f"port={port}", "served_model_name=quickstart",
           "log_level=warning"]
    log("$ lmforge serve " + " ".join(cmd[4:]))
    proc = subprocess.Popen(cmd, env={**os.environ, "PYTHONUNBUFFERED": "1"}, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    try:
        startup = wait_healthy(url, proc, timeout=120)
        client = OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0)
        t0 = time.perf_counter()
        first = None
        pieces = []
        stream = client.chat.completions.create(model="quickstart", stream=True, max_tokens=48, temperature=0,
                                                messages=[{"role": "user", "content": question}],
                                                stream_options={"include_usage": True})
        usage = None
        for chunk in stream:
            if chunk.choices and chunk.choices[0].delta.content:
                first = first or time.perf_counter()
                pieces.append(chunk.choices[0].delta.content)
            if chunk.usage is not None:
                usage = chunk.usage
        total = time.perf_counter() - t0
        import httpx

        metrics_text = httpx.get(url + "/metrics", timeout=5.0).text
        reply = "".join(pieces)
        out_tokens = usage.completion_tokens if usage else len(pieces)
        log(f"user: {question}\nassistant: {reply}")
        return {"url": url, "question": question, "reply": reply, "startup_seconds": startup,
                "ttft_seconds": (first - t0) if first else None, "seconds": total, "completion_tokens": out_tokens,
                "tokens_per_second": out_tokens / total if total > 0 else 0.0,
                "metrics_lines": sum(1 for line in metrics_text.splitlines() if line.startswith("lmforge_"))}
    finally:
        if proc.poll() is None:
            proc.send_signal(2)  # SIGINT: uvicorn stops accepting, drains in-flight requests, exits
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
