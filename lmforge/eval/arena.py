"""The arena: models answer a prompt set, pairs of answers are judged, and ratings rank the models.

```python
from lmforge.eval.arena import ArenaConfig, ArenaModel, run_arena
cfg = ArenaConfig(prompts="prompts.jsonl", out_dir="runs/arena",
                  models=[ArenaModel(name="base", path="runs/pretrain/model"),
                          ArenaModel(name="sft", path="runs/pretrain/model", adapter="runs/sft/adapter"),
                          ArenaModel(name="remote", kind="openai", base_url="http://host:8000/v1", model="m")])
cfg.judge.model = "judge-model"                       # any OpenAI-compatible endpoint (judge.base_url)
result = run_arena(cfg)                               # result.leaderboards["bt"].to_markdown()
```

Prompt set: JSONL, one prompt per line: {"id": "...", "prompt": "..."} or {"id", "messages": [...]} (an
OpenAI-style conversation whose last turn is the user's); `id` defaults to "line-N".

Answers come from an lmforge model directory (plus optional PEFT adapter) through the LLMEngine with the
model's chat template, or from any OpenAI-compatible chat endpoint through the official `openai` client.
Battles are scheduled over every unordered pair of models on every prompt (`pairs="all"`) or as a seeded
random sample of `num_battles` of those (`pairs="random"`); which model sits in position A is drawn with
the same seed. Battles are judged by the LLM judge (arena_judge.py, with position swap); human votes
(JSONL) can be added to or replace the judge's battles.

Outputs in `out_dir`: answers.jsonl, battles.jsonl, leaderboard.json, leaderboard.md. Every write is an
atomic rewrite (temp file + rename) every `flush_every` records and at the end, so a killed run leaves
complete files. Each record carries a fingerprint of what produced it (model spec, prompt and generation
settings; judge settings and the two answers), so a rerun skips exactly the answers and battles already on
disk whose inputs are unchanged, and redoes the rest (e.g. a model retrained in place, another judge).
"""
from __future__ import annotations

import hashlib
import json
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Literal, Sequence

import numpy as np

from ..config import opt
from ..core.errors import ConfigError, DataError, LMForgeError
from ..core.io import atomic_write_json, atomic_write_text
from ..data.readers import ReadStats, bad_line, iter_json_objects
from .arena_judge import JudgeConfig, LLMJudge, openai_client, read_human_votes
from .arena_ratings import Battle, Leaderboard, leaderboard

END_OF_TURN_TOKENS = ("<|im_end|>", "<|eot_id|>", "<|end|>", "<end_of_turn>")


@dataclass
class ArenaModel:
    """One contestant: an lmforge model directory or a model behind an OpenAI-compatible endpoint."""

    name: str = opt("", "the name shown on the leaderboard (unique)")
    kind: Literal["lmforge", "openai"] = opt("lmforge", "lmforge: a local model directory; openai: an endpoint")
    path: str = opt("", "lmforge: model directory (HF layout with tokenizer)")
    adapter: str = opt("", "lmforge: optional PEFT adapter directory applied on top (its tokenizer wins if it has one)")
    chat: bool = opt(True, "lmforge: render prompts with the model's chat template (false: raw prompt text)")
    device: str = opt("auto", "lmforge: auto | cpu | cuda")
    dtype: str = opt("auto", "lmforge: auto | float32 | bfloat16 | float16")
    base_url: str = opt("", "openai: the endpoint's base URL (…/v1)")
    model: str = opt("", "openai: the model name the endpoint serves (default: name)")
    api_key: str = opt("", "openai: API key (empty: read api_key_env)")
    api_key_env: str = opt("OPENAI_API_KEY", "openai: environment variable holding the API key")


@dataclass
class ArenaConfig:
    prompts: str = opt("", "prompt set (JSONL: {id, prompt} or {id, messages})")
    models: list[ArenaModel] = opt([], "contestants (at least two, unless only human_votes are rated)")
    out_dir: str = opt("runs/arena", "where answers.jsonl, battles.jsonl and leaderboard.{json,md} go")
    pairs: Literal["all", "random"] = opt("all", "all: every pair on every prompt; random: num_battles sampled")
    num_battles: int = opt(0, "battles to sample when pairs=random")
    seed: int = opt(0, "seed for battle sampling, A/B placement, generation and bootstrap")
    max_tokens: int = opt(256, "longest answer, in tokens")
    temperature: float = opt(0.0, "answer sampling temperature (0: greedy)")
    concurrency: int = opt(4, "parallel requests to OpenAI-compatible endpoints")
    judge: JudgeConfig = opt(JudgeConfig, "the LLM judge (judge.model empty: no judge, human votes only)")
    human_votes: str = opt("", "optional JSONL of human votes {model_a, model_b, winner} rated with the battles")
    on_error: Literal["raise", "skip"] = opt("raise", "bad prompt / vote lines: stop (raise) or skip and count")
    methods: list[str] = opt(["bt", "elo"], "rating methods for the leaderboard: bt (Bradley–Terry), elo")
    elo_k: float = opt(16.0, "Elo K factor: rating points at stake per battle (smaller: steadier, slower)")
    scale: float = opt(400.0, "rating scale: a gap of `scale` means 10:1 odds")
    base: float = opt(1000.0, "starting Elo / mean Bradley–Terry rating")
    prior: float = opt(0.01, "Bradley–Terry virtual tie battles per model pair (keeps unbeaten models finite)")
    bootstrap_rounds: int = opt(200, "bootstrap resamples for the 95% intervals (0: no intervals)")
    flush_every: int = opt(16, "rewrite the output files after this many new records")

    def validate(self) -> None:
        names = [m.name for m in self.models]
        if any(not n for n in names):
            raise ConfigError("models: every model needs a name")
        if len(set(names)) != len(names):
            raise ConfigError(f"models: names must be unique, got {names}")
        for m in self.models:
            if m.kind == "lmforge" and not m.path:
                raise ConfigError(f"models[{m.name}]: kind=lmforge needs path=DIR")
            if m.kind == "openai" and not m.base_url:
                raise ConfigError(f"models[{m.name}]: kind=openai needs base_url")
        for method in self.methods:
            if method not in ("bt", "elo"):
                raise ConfigError(f"methods: {method!r} is not bt or elo")
        if self.pairs == "random" and self.num_battles < 1:
            raise ConfigError("pairs=random needs num_battles >= 1")
        if self.max_tokens < 1 or self.concurrency < 1 or self.flush_every < 1:
            raise ConfigError("max_tokens, concurrency and flush_every must be >= 1")


# ---- prompts and schedule -------------------------------------------------------------------------------

@dataclass(frozen=True)
class ArenaPrompt:
    id: str
    messages: tuple[tuple[str, str], ...]  # (role, content); the last is the user's turn

    @property
    def question(self) -> str:
        return self.messages[-1][1]

    def as_messages(self) -> list[dict[str, str]]:
        return [{"role": role, "content": content} for role, content in self.messages]


def read_prompts(path: str | Path, on_error: str = "raise", stats: ReadStats | None = None) -> list[ArenaPrompt]:
    """The prompt set; a malformed line or a repeated id is a DataError naming file:line (or skipped)."""
    path, stats = Path(path), stats if stats is not None else ReadStats()
    if not path.is_file():
        raise DataError(f"prompt set not found: {path}")
    prompts: dict[str, ArenaPrompt] = {}
    for lineno, obj in iter_json_objects(path, on_error, stats):
        problem, messages = None, None
        if isinstance(obj.get("prompt"), str) and obj["prompt"].strip():
            messages = (("user", obj["prompt"]),)
        elif isinstance(obj.get("messages"), list) and obj["messages"]:
            turns = obj["messages"]
            if all(isinstance(t, dict) and isinstance(t.get("role"), str) and isinstance(t.get("content"), str)
                   for t in turns) and turns[-1]["role"] == "user":
                messages = tuple((t["role"], t["content"]) for t in turns)
            else:
                problem = "messages must be {role, content} objects ending with a user turn"
        else:
            problem = "expected a non-empty 'prompt' string or a 'messages' list"
        prompt_id = str(obj.get("id", f"line-{lineno}"))
        if problem is None and prompt_id in prompts:
            problem = f"id {prompt_id!r} appears twice"
        if problem is not None:
            bad_line(path, lineno, problem, on_error, stats)
            continue
        stats.documents += 1
        prompts[prompt_id] = ArenaPrompt(prompt_id, messages)  # type: ignore[arg-type]
    if not prompts:
        raise DataError(f"{path}: no prompts")
    return list(prompts.values())


@dataclass(frozen=True)
class Pairing:
    prompt_id: str
    model_a: str
    model_b: str

    @property
    def battle_id(self) -> str:
        return f"{self.prompt_id}|{self.model_a}|{self.model_b}"


def schedule_battles(prompt_ids: Sequence[str], models: Sequence[str], pairs: str = "all", num_battles: int = 0,
                     seed: int = 0) -> list[Pairing]:
    """Every (prompt, unordered model pair), or a seeded sample of `num_battles`; A/B placement is seeded."""
    rng = np.random.default_rng(seed)
    everything = [(p, models[i], models[j]) for p in prompt_ids
                  for i in range(len(models)) for j in range(i + 1, len(models))]
    if pairs == "random":
        picked = rng.choice(len(everything), size=min(num_battles, len(everything)), replace=False)
        everything = [everything[i] for i in sorted(picked.tolist())]
    elif pairs != "all":
        raise ConfigError(f"pairs={pairs!r} is not 'all' or 'random'")
    flips = rng.random(len(everything)) < 0.5
    return [Pairing(p, b, a) if flip else Pairing(p, a, b) for (p, a, b), flip in zip(everything, flips.tolist())]


# ---- resumable JSONL records ----------------------------------------------------------------------------

class JsonlStore:
    """Records keyed by `key(record)`, loaded from `path` if it exists and rewritten atomically on flush."""

    def __init__(self, path: str | Path, key: Callable[[dict], str], flush_every: int = 16) -> None:
        self.path, self.key, self.flush_every = Path(path), key, flush_every
        self.records: dict[str, dict] = {}
        self._pending = 0
        if self.path.exists():
            for lineno, obj in iter_json_objects(self.path):
                try:
                    self.records[key(obj)] = obj
                except KeyError as e:
                    raise DataError(f"{self.path}:{lineno}: record lacks {e}; delete the file to start over") from None

    def __contains__(self, key: str) -> bool:
        return key in self.records

    def add(self, record: dict) -> None:
        self.records[self.key(record)] = record
        self._pending += 1
        if self._pending >= self.flush_every:
            self.flush()

    def flush(self) -> None:
        atomic_write_text(self.path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in self.records.values()))
        self._pending = 0


def _answer_key(record: dict) -> str:
    return f"{record['model']}|{record['prompt_id']}"


def fingerprint(*parts: Any) -> str:
    """A short stable hash of what produced a record: a rerun redoes records whose inputs changed."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode("utf-8")).hexdigest()[:16]


def weights_stamp(spec: ArenaModel) -> list[tuple[str, int, int]]:
    """(file, size, mtime) of a local model's and adapter's safetensors: changes when either is retrained."""
    if spec.kind != "lmforge":
        return []
    files = [f for d in (spec.path, spec.adapter) if d for f in sorted(Path(d).glob("*.safetensors"))]
    return [(f.name, f.stat().st_size, f.stat().st_mtime_ns) for f in files]


def answer_fingerprint(spec: ArenaModel, stamp: list, prompt: ArenaPrompt, cfg: ArenaConfig) -> str:
    """The model (spec without keys, weight files), the prompt and the generation settings of one answer."""
    model = {k: v for k, v in vars(spec).items() if k not in ("api_key", "api_key_env")}
    return fingerprint(model, stamp, prompt.messages, cfg.max_tokens, cfg.temperature, cfg.seed)


def battle_fingerprint(cfg: ArenaConfig, question: str, answer_a: str, answer_b: str) -> str:
    """The judge, its settings and the two answers it compared."""
    judge = (cfg.judge.base_url, cfg.judge.model, cfg.judge.temperature, cfg.judge.max_tokens, cfg.judge.swap)
    return fingerprint(judge, question, answer_a, answer_b)


# ---- answering ------------------------------------------------------------------------------------------

class EngineAnswerer:
    """Answers with a local lmforge model (+ adapter) through the LLMEngine, chat template applied."""

    def __init__(self, spec: ArenaModel, max_tokens: int, temperature: float, seed: int) -> None:
        from ..core.device import pick_device
        from ..infer import LLMEngine
        from .harness import load_model
        from .suite import ModelSpec

        model, self.tokenizer = load_model(ModelSpec(name=spec.name, path=spec.path, adapter=spec.adapter,
                                                     dtype=spec.dtype), pick_device(spec.device))
        if spec.chat and not self.tokenizer.chat_template:
            raise ConfigError(f"models[{spec.name}]: the tokenizer of {spec.path} has no chat template; "
                              "set chat: false to send the raw prompt")
        self.spec = spec
        self.engine = LLMEngine(model, self.tokenizer, max_num_seqs=8, seed=seed)
        self.max_tokens, self.temperature, self.seed = max_tokens, temperature, seed
        ids = (self.tokenizer.token_to_id(t) for t in END_OF_TURN_TOKENS)
        self.stop_token_ids = sorted({i for i in ids if i is not None})

    def prompt_ids(self, prompt: ArenaPrompt) -> list[int]:
        if self.spec.chat:
            return self.tokenizer.apply_chat_template(prompt.as_messages(), add_generation_prompt=True, tokenize=True)
        return self.tokenizer.encode("\n\n".join(content for _, content in prompt.messages))

    def answer(self, prompts: Sequence[ArenaPrompt]) -> list[dict[str, Any]]:
        from ..infer import SamplingParams

        ids, params = [], []
        for p in prompts:
            tokens = self.prompt_ids(p)
            room = self.engine.max_model_len - len(tokens)
            if room < 1:
                raise ConfigError(f"prompt {p.id!r} has {len(tokens)} tokens, too long for model {self.spec.name!r} "
                                  f"(max_model_len={self.engine.max_model_len})")
            ids.append(tokens)
            params.append(SamplingParams(max_tokens=min(self.max_tokens, room), temperature=self.temperature,
                                         seed=self.seed, stop_token_ids=self.stop_token_ids or None))
        started = time.perf_counter()
        outputs = self.engine.generate(ids, params)
        seconds = (time.perf_counter() - started) / max(len(prompts), 1)
        return [{"output": o.outputs[0].text, "finish_reason": o.outputs[0].finish_reason, "seconds": seconds}
                for o in outputs]


class OpenAIAnswerer:
    """Answers through an OpenAI-compatible chat endpoint (the official client), a few requests at a time."""

    def __init__(self, spec: ArenaModel, max_tokens: int, temperature: float, seed: int, concurrency: int,
                 client: Any = None) -> None:
        self.spec, self.max_tokens, self.temperature, self.seed = spec, max_tokens, temperature, seed
        self.concurrency = concurrency
        self.client = client or openai_client(spec.base_url, spec.api_key, spec.api_key_env, 300.0, 2)

    def _one(self, prompt: ArenaPrompt) -> dict[str, Any]:
        started = time.perf_counter()
        extra = {"seed": self.seed} if self.temperature > 0 else {}  # greedy needs no seed (some servers lack it)
        response = self.client.chat.completions.create(
            model=self.spec.model or self.spec.name, messages=prompt.as_messages(), max_tokens=self.max_tokens,
            temperature=self.temperature, **extra)
        choice = response.choices[0]
        return {"output": choice.message.content or "", "finish_reason": choice.finish_reason,
                "seconds": time.perf_counter() - started}

    def answer(self, prompts: Sequence[ArenaPrompt]) -> list[dict[str, Any]]:
        with ThreadPoolExecutor(self.concurrency) as pool:
            return list(pool.map(self._one, prompts))


def _endpoint_errors() -> tuple[type[BaseException], ...]:
    try:
        import openai

        return (openai.APIError,)
    except ImportError:  # pragma: no cover
        return ()


def collect_answers(cfg: ArenaConfig, prompts: Sequence[ArenaPrompt], needed: dict[str, set[str]],
                    store: JsonlStore, log: Callable[[str], None] = print) -> None:
    """Generate the answers in `needed` (model -> prompt ids) that `store` does not hold yet."""
    by_id = {p.id: p for p in prompts}
    for spec in cfg.models:
        stamp = weights_stamp(spec)
        marks = {i: answer_fingerprint(spec, stamp, by_id[i], cfg) for i in needed.get(spec.name, ())}
        todo = [by_id[i] for i in sorted(marks)
                if store.records.get(f"{spec.name}|{i}", {}).get("fingerprint") != marks[i]]
        if not todo:
            continue
        log(f"arena: {spec.name} answers {len(todo)} prompts")
        answerer: Any = (EngineAnswerer(spec, cfg.max_tokens, cfg.temperature, cfg.seed) if spec.kind == "lmforge"
                         else OpenAIAnswerer(spec, cfg.max_tokens, cfg.temperature, cfg.seed, cfg.concurrency))
        try:
            for start in range(0, len(todo), cfg.flush_every):
                chunk = todo[start:start + cfg.flush_every]
                for prompt, result in zip(chunk, answerer.answer(chunk)):
                    store.add({"model": spec.name, "prompt_id": prompt.id, **result,
                               "fingerprint": marks[prompt.id]})
        except _endpoint_errors() as e:
            raise LMForgeError(f"model {spec.name!r} at {spec.base_url}: {type(e).__name__}: {e}") from None
        finally:
            store.flush()  # whatever was answered survives a failure or Ctrl-C


# ---- the whole run --------------------------------------------------------------------------------------

@dataclass
class ArenaResult:
    battles: list[dict[str, Any]]
    leaderboards: dict[str, Leaderboard]
    unjudged: int = 0                      # battles whose verdicts could not be parsed
    human_votes: int = 0
    out_dir: Path = field(default_factory=Path)


def judge_battles(cfg: ArenaConfig, schedule: Sequence[Pairing], prompts: Sequence[ArenaPrompt],
                  answers: JsonlStore, store: JsonlStore, judge: LLMJudge | None = None,
                  log: Callable[[str], None] = print) -> None:
    """Judge every scheduled battle not yet in `store` (in parallel up to cfg.concurrency)."""
    questions = {p.id: p.question for p in prompts}

    def inputs(pairing: Pairing) -> tuple[str, str, str]:
        return (questions[pairing.prompt_id], answers.records[f"{pairing.model_a}|{pairing.prompt_id}"]["output"],
                answers.records[f"{pairing.model_b}|{pairing.prompt_id}"]["output"])

    todo = [p for p in schedule
            if store.records.get(p.battle_id, {}).get("fingerprint") != battle_fingerprint(cfg, *inputs(p))]
    if not todo:
        return
    judge = judge or LLMJudge(cfg.judge)
    log(f"arena: judging {len(todo)} battles with {cfg.judge.model}")

    def one(pairing: Pairing) -> dict[str, Any]:
        question, a, b = inputs(pairing)
        verdict = judge.judge(question, a, b)
        return {"battle_id": pairing.battle_id, "prompt_id": pairing.prompt_id, "model_a": pairing.model_a,
                "model_b": pairing.model_b, "judge": cfg.judge.model, "swap": cfg.judge.swap, **verdict.to_dict(),
                "fingerprint": battle_fingerprint(cfg, question, a, b)}

    try:
        with ThreadPoolExecutor(cfg.concurrency) as pool:
            for record in pool.map(one, todo):
                store.add(record)
    except _endpoint_errors() as e:
        raise LMForgeError(f"judge endpoint {cfg.judge.base_url}: {type(e).__name__}: {e}") from None
    finally:
        store.flush()  # whatever was judged survives a failure or Ctrl-C


def rate(battles: Iterable[Battle], cfg: ArenaConfig) -> dict[str, Leaderboard]:
    """One leaderboard per configured method."""
    battles = list(battles)
    boards = {}
    for method in cfg.methods:
        extra = {"k": cfg.elo_k} if method == "elo" else {"prior": cfg.prior}
        boards[method] = leaderboard(battles, method, cfg.bootstrap_rounds, cfg.seed, scale=cfg.scale,
                                     base=cfg.base, **extra)
    return boards


def write_leaderboards(boards: dict[str, Leaderboard], out_dir: Path, extra: dict[str, Any]) -> None:
    atomic_write_json(out_dir / "leaderboard.json", {**extra, **{m: b.to_dict() for m, b in boards.items()}})
    names = {"bt": "Bradley–Terry", "elo": "online Elo"}
    text = "".join(f"## {names.get(m, m)}\n\n{b.to_markdown()}\n" for m, b in boards.items())
    atomic_write_text(out_dir / "leaderboard.md", text)


def run_arena(cfg: ArenaConfig, judge: LLMJudge | None = None, log: Callable[[str], None] = print) -> ArenaResult:
    """Answers → battles → judge (+ human votes) → leaderboards, resumable (see the module docstring)."""
    cfg.validate()
    out_dir = Path(cfg.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    judged: list[dict[str, Any]] = []
    unjudged = 0
    if cfg.models and (cfg.judge.model or judge is not None):
        if len(cfg.models) < 2:
            raise ConfigError("an arena needs at least two models")
        if not cfg.prompts:
            raise ConfigError("prompts is empty: give the prompt set (JSONL)")
        prompts = read_prompts(cfg.prompts, cfg.on_error)
        schedule = schedule_battles([p.id for p in prompts], [m.name for m in cfg.models], cfg.pairs,
                                    cfg.num_battles, cfg.seed)
        needed: dict[str, set[str]] = {}
        for p in schedule:
            needed.setdefault(p.model_a, set()).add(p.prompt_id)
            needed.setdefault(p.model_b, set()).add(p.prompt_id)
        answers = JsonlStore(out_dir / "answers.jsonl", _answer_key, cfg.flush_every)
        collect_answers(cfg, prompts, needed, answers, log)
        store = JsonlStore(out_dir / "battles.jsonl", lambda r: r["battle_id"], cfg.flush_every)
        judge_battles(cfg, schedule, prompts, answers, store, judge, log)
        wanted = {p.battle_id for p in schedule}
        judged = [r for r in store.records.values() if r["battle_id"] in wanted]
        unjudged = sum(r["winner"] is None for r in judged)
    elif not cfg.human_votes:
        raise ConfigError("nothing to rate: set judge.model (with models and prompts) and/or human_votes")
    battles = [Battle(r["model_a"], r["model_b"], r["winner"]) for r in judged if r["winner"] is not None]
    votes = read_human_votes(cfg.human_votes, cfg.on_error) if cfg.human_votes else []
    boards = rate(battles + votes, cfg)
    write_leaderboards(boards, out_dir, {"judged_battles": len(battles), "unparseable_verdicts": unjudged,
                                         "human_votes": len(votes)})
    for method, board in boards.items():
        log(f"arena: {method} leaderboard\n{board.to_markdown()}")
    return ArenaResult(judged, boards, unjudged, len(votes), out_dir)
