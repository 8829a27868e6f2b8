"""Code generation scored by pass@k: n samples per problem from the engine, each run against the problem's
tests in the sandbox (a separate process with time/memory limits and no network).

Data (JSONL): HumanEval's layout `{"task_id", "prompt", "test", "entry_point"}` (the program is the prompt
plus the completion, then `test`, then `check(entry_point)`), or `{"prompt", "tests": ["assert ...", ...]}`.
A completion stops at the first top-level statement after the function (HumanEval's stop sequences).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from ..core.errors import ConfigError, DataError
from .metrics import pass_at_k
from .sandbox import SandboxLimits, run_python

STOP_SEQUENCES = ["\ndef ", "\nclass ", "\nif __name__", "\nprint(", "\n#", "\nassert "]


@dataclass(frozen=True)
class CodeProblem:
    task_id: str
    prompt: str
    tests: str
    source: str = ""


def problem_from_record(record: dict[str, Any], index: int, source: str = "") -> CodeProblem:
    """A CodeProblem from a HumanEval-style or prompt+tests record; ValueError naming what is missing."""
    prompt = record.get("prompt")
    if not isinstance(prompt, str) or not prompt.strip():
        raise ValueError("a code problem needs a non-empty 'prompt'")
    if "test" in record:
        tests = str(record["test"])
        if record.get("entry_point"):
            tests += f"\n\ncheck({record['entry_point']})\n"
    elif isinstance(record.get("tests"), list) and record["tests"]:
        tests = "\n".join(str(t) for t in record["tests"]) + "\n"
    else:
        raise ValueError("a code problem needs 'test' (+ 'entry_point') or a non-empty 'tests' list")
    return CodeProblem(str(record.get("task_id", index)), prompt, tests, source)


def read_code_jsonl(path: str | Path, on_error: str = "raise") -> list[CodeProblem]:
    from ..data.readers import ReadStats, bad_line, iter_json_objects

    path, stats = Path(path), ReadStats()
    if not path.is_file():
        raise DataError(f"code task file not found: {path}")
    problems = []
    for line, record in iter_json_objects(path, on_error, stats):
        try:
            problems.append(problem_from_record(record, len(problems), f"{path}:{line}"))
        except ValueError as e:
            bad_line(path, line, str(e), on_error, stats)
    return problems


def truncate_completion(text: str, stops: Sequence[str] = STOP_SEQUENCES) -> str:
    """The completion up to the first stop sequence."""
    cut = min((i for i in (text.find(s) for s in stops) if i >= 0), default=len(text))
    return text[:cut]


@dataclass
class CodeResult:
    metrics: dict[str, Any]
    samples: list[dict[str, Any]]
    generations: Any


def evaluate_code(model: Any, tokenizer: Any, problems: Sequence[CodeProblem], *, n: int = 1,
                  ks: Sequence[int] = (1,), temperature: float = 0.0, top_p: float = 1.0, max_new_tokens: int = 128,
                  batch_size: int = 8, seed: int = 0, limits: SandboxLimits | None = None,
                  engine: Any = None) -> CodeResult:
    """pass@k for every k <= n over `problems` (n samples each, via SamplingParams n / temperature)."""
    from ..infer import SamplingParams
    from .generative import generate, make_engine, prompt_ids, stop_token_ids

    ks = sorted(set(int(k) for k in ks))
    if not ks or ks[0] < 1 or ks[-1] > n:
        raise ConfigError(f"pass@k needs 1 <= k <= n (n={n} samples per problem), got k={ks}")
    if n > 1 and temperature <= 0.0:
        raise ConfigError(f"n={n} samples at temperature 0 are n copies of the greedy one: set temperature > 0")
    engine = engine or make_engine(model, tokenizer, batch_size, seed)
    params = [SamplingParams(n=n, temperature=temperature, top_p=top_p, max_tokens=max_new_tokens,
                             seed=seed * 1_000_003 + index * n, stop=STOP_SEQUENCES,
                             stop_token_ids=stop_token_ids(tokenizer)) for index in range(len(problems))]
    generations = generate(engine, [prompt_ids(tokenizer, p.prompt, chat=False) for p in problems], params)
    limits = limits or SandboxLimits(timeout_s=10.0, cpu_s=10, memory_mb=1024)
    counts, samples = [], []
    for problem, texts in zip(problems, generations.texts):
        passed = 0
        for text in texts:
            completion = truncate_completion(text)
            verdict = run_python(problem.prompt + completion, problem.tests, limits)
            passed += verdict.passed
            if len(samples) < 20:
                samples.append({"task_id": problem.task_id, "completion": completion, "status": verdict.status,
                                "reason": verdict.reason})
        counts.append((len(texts), passed))
    metrics: dict[str, Any] = {f"pass@{k}": sum(pass_at_k(c[0], c[1], k) for c in counts) / len(counts)
                               if counts else float("nan") for k in ks}
    metrics.update(num_problems=len(problems), samples_per_problem=n)
    return CodeResult(metrics, samples, generations)
