"""Load benchmark for any OpenAI-compatible server (ours, vLLM, llama.cpp's): `run_bench_serve(Config(...))`.

Requests arrive as a Poisson process at `request_rate` per second (or all at once: `arrival=burst`), at
most `concurrency` in flight; prompt and output lengths are drawn from fixed/uniform/normal distributions
around their means. Every request streams, so the client measures what a user sees:

- TTFT: send → first token event (the server sends one per step in which a choice got tokens, even
  when they add no text yet); ITL: gaps between token events; TPOT: (latency − TTFT) / (output
  tokens − 1) per request; E2E: send → last byte;
- request throughput (completed / wall time), output tokens/s, total (prompt + output) tokens/s.

Token counts come from the server's `usage` (`stream_options.include_usage`), so they are exact; prompts
are random words from a fixed list, about one token each for a BPE tokenizer. `ignore_eos` (a vLLM
extension our server also takes) makes outputs run to their drawn length.
"""
from __future__ import annotations

import asyncio
import json
import random
import statistics
import time
from dataclasses import asdict, dataclass, field

from ..config import opt
from ..core.errors import ConfigError

_WORDS = ("time river stone light north market paper window garden signal number music winter letter bridge "
          "forest machine ocean travel mountain silver planet answer kitchen morning doctor island teacher").split()


@dataclass
class Config:
    url: str = opt("http://127.0.0.1:8000", "server base URL (the OpenAI API lives under /v1)")
    model: str = opt("", "model name to send (empty: the first of GET /v1/models)")
    api_key: str = opt("", "API key sent as 'Authorization: Bearer ...' (empty: none)")
    endpoint: str = opt("completions", "completions | chat")
    num_requests: int = opt(64, "requests to send")
    arrival: str = opt("poisson", "poisson (exponential gaps at request_rate) | burst (all at once)")
    request_rate: float = opt(4.0, "mean requests per second for poisson arrivals")
    concurrency: int = opt(16, "most requests in flight at once (0 = no limit)")
    prompt_len: int = opt(64, "mean prompt length: in tokens with `tokenizer`, else in words (often 1-3 tokens each)")
    output_len: int = opt(64, "mean output length in tokens (max_tokens of each request)")
    length_dist: str = opt("uniform", "fixed | uniform (mean × [1 − spread, 1 + spread]) | normal "
                                      "(sd = spread × mean)")
    length_spread: float = opt(0.5, "relative spread of prompt and output lengths")
    temperature: float = opt(0.0, "sampling temperature sent with every request")
    ignore_eos: bool = opt(True, "ask the server to ignore EOS so outputs reach their drawn length")
    seed: int = opt(0, "seed of the arrival times and lengths")
    timeout: float = opt(600.0, "seconds one request may take")
    output: str = opt("", "write the result JSON to this file (empty: do not write)")
    tokenizer: str = opt("", "the served model's tokenizer (directory or tokenizer.json): prompts are cut to "
                             "exactly prompt_len tokens and sent as token ids (completions endpoint)")

    def validate(self) -> None:
        if self.endpoint not in ("completions", "chat"):
            raise ConfigError(f"bench.endpoint={self.endpoint!r} must be 'completions' or 'chat'")
        if self.arrival not in ("poisson", "burst"):
            raise ConfigError(f"bench.arrival={self.arrival!r} must be 'poisson' or 'burst'")
        if self.length_dist not in ("fixed", "uniform", "normal"):
            raise ConfigError(f"bench.length_dist={self.length_dist!r} must be fixed, uniform or normal")
        for key in ("num_requests", "prompt_len", "output_len"):
            if getattr(self, key) < 1:
                raise ConfigError(f"bench.{key}={getattr(self, key)} must be >= 1")
        if self.arrival == "poisson" and self.request_rate <= 0:
            raise ConfigError(f"bench.request_rate={self.request_rate} must be > 0 for poisson arrivals")
        if self.tokenizer and self.endpoint != "completions":
            raise ConfigError("bench.tokenizer sends token-id prompts, which only the completions endpoint takes")
        if self.concurrency < 0 or self.length_spread < 0:
            raise ConfigError("bench.concurrency and bench.length_spread must be >= 0")


@dataclass
class RequestResult:
    ok: bool
    prompt_tokens: int = 0
    output_tokens: int = 0
    ttft: float | None = None
    latency: float = 0.0
    itl: list[float] = field(default_factory=list)
    error: str = ""


def draw_length(rng: random.Random, mean: int, dist: str, spread: float) -> int:
    if dist == "fixed":
        return mean
    if dist == "uniform":
        return max(1, round(rng.uniform(mean * (1 - spread), mean * (1 + spread))))
    return max(1, round(rng.gauss(mean, spread * mean)))


def prompt_encoder(path: str):
    """`encode(text) -> ids` of a tokenizer.json (no special tokens), or None without a tokenizer."""
    if not path:
        return None
    from pathlib import Path

    from tokenizers import Tokenizer

    file = Path(path) / "tokenizer.json" if Path(path).is_dir() else Path(path)
    if not file.is_file():
        raise ConfigError(f"bench.tokenizer={path!r}: no tokenizer.json there")
    tokenizer = Tokenizer.from_file(str(file))
    return lambda text: tokenizer.encode(text, add_special_tokens=False).ids


def make_prompt(rng: random.Random, length: int, encode=None) -> str | list[int]:
    """`length` random words, or with `encode` exactly `length` tokens of them (token ids)."""
    if encode is None:
        return " ".join(rng.choice(_WORDS) for _ in range(length))
    ids: list[int] = []
    while len(ids) < length:
        ids.extend(encode(" " + " ".join(rng.choice(_WORDS) for _ in range(length))))
    return ids[:length]


def _body(cfg: Config, model: str, prompt: str | list[int], max_tokens: int) -> tuple[str, dict]:
    common = {"model": model, "max_tokens": max_tokens, "temperature": cfg.temperature, "stream": True,
              "stream_options": {"include_usage": True}, "ignore_eos": cfg.ignore_eos}
    if cfg.endpoint == "chat":
        return "/v1/chat/completions", {**common, "messages": [{"role": "user", "content": prompt}]}
    return "/v1/completions", {**common, "prompt": prompt}


async def _one(client, cfg: Config, model: str, prompt: str | list[int], max_tokens: int) -> RequestResult:
    path, body = _body(cfg, model, prompt, max_tokens)
    result = RequestResult(ok=False)
    started = time.perf_counter()
    last = None
    chunks = 0
    try:
        async with client.stream("POST", path, json=body, timeout=cfg.timeout) as response:
            if response.status_code != 200:
                result.error = f"HTTP {response.status_code}: {(await response.aread())[:200]!r}"
                return result
            async for line in response.aiter_lines():
                if not line.startswith("data: "):
                    continue
                data = line[6:]
                if data == "[DONE]":
                    break
                event = json.loads(data)
                if "error" in event:
                    result.error = str(event["error"].get("message"))
                    return result
                if event.get("usage"):
                    result.prompt_tokens = event["usage"]["prompt_tokens"]
                    result.output_tokens = event["usage"]["completion_tokens"]
                for choice in event.get("choices", []):
                    delta = choice.get("delta") or {}
                    if "text" not in choice and ("role" in delta or "content" not in delta):
                        continue  # chat's opening role event, or a finish-only event: no token
                    now = time.perf_counter()
                    if last is None:
                        result.ttft = now - started
                    else:
                        result.itl.append(now - last)
                    last = now
                    chunks += 1
        result.latency = time.perf_counter() - started
        result.output_tokens = result.output_tokens or chunks
        result.ok = result.ttft is not None
        if not result.ok:
            result.error = "the stream carried no tokens"
    except Exception as e:  # noqa: BLE001 - a failed request is counted, the run goes on
        result.error = f"{type(e).__name__}: {e}"
    return result


def _percentiles(values: list[float], scale: float = 1000.0) -> dict[str, float | None]:
    if not values:
        return {"mean": None, "p50": None, "p90": None, "p99": None}
    ordered = sorted(values)

    def pick(q: float) -> float:  # nearest-rank percentile
        return ordered[min(len(ordered) - 1, max(0, round(q * len(ordered) + 0.5) - 1))] * scale
    return {"mean": statistics.fmean(ordered) * scale, "p50": pick(0.50), "p90": pick(0.90), "p99": pick(0.99)}


def summarize(results: list[RequestResult], duration: float) -> dict:
    done = [r for r in results if r.ok]
    output_tokens = sum(r.output_tokens for r in done)
    prompt_tokens = sum(r.prompt_tokens for r in done)
    tpot = [(r.latency - r.ttft) / (r.output_tokens - 1) for r in done if r.output_tokens > 1]
    return {
        "completed": len(done), "failed": len(results) - len(done), "duration_s": duration,
        "errors": sorted({r.error for r in results if not r.ok})[:5],
        "prompt_tokens": prompt_tokens, "output_tokens": output_tokens,
        "request_throughput": len(done) / duration if duration else 0.0,
        "output_tokens_per_s": output_tokens / duration if duration else 0.0,
        "total_tokens_per_s": (prompt_tokens + output_tokens) / duration if duration else 0.0,
        "ttft_ms": _percentiles([r.ttft for r in done]),
        "tpot_ms": _percentiles(tpot),
        "itl_ms": _percentiles([gap for r in done for gap in r.itl]),
        "e2e_ms": _percentiles([r.latency for r in done]),
    }


async def bench(cfg: Config) -> dict:
    import httpx

    cfg.validate()
    rng = random.Random(cfg.seed)
    headers = {"Authorization": f"Bearer {cfg.api_key}"} if cfg.api_key else {}
    limits = httpx.Limits(max_connections=cfg.concurrency or None, max_keepalive_connections=cfg.concurrency or None)
    async with httpx.AsyncClient(base_url=cfg.url.rstrip("/"), headers=headers, limits=limits,
                                 timeout=cfg.timeout) as client:
        model = cfg.model
        if not model:
            listing = (await client.get("/v1/models")).json()
            model = listing["data"][0]["id"]
        plan = []
        at = 0.0
        encode = prompt_encoder(cfg.tokenizer)
        for _ in range(cfg.num_requests):
            prompt = make_prompt(rng, draw_length(rng, cfg.prompt_len, cfg.length_dist, cfg.length_spread), encode)
            plan.append((at, prompt, draw_length(rng, cfg.output_len, cfg.length_dist, cfg.length_spread)))
            if cfg.arrival == "poisson":
                at += rng.expovariate(cfg.request_rate)
        gate = asyncio.Semaphore(cfg.concurrency) if cfg.concurrency else None
        started = time.perf_counter()

        async def scheduled(at: float, prompt: str | list[int], max_tokens: int) -> RequestResult:
            await asyncio.sleep(max(0.0, started + at - time.perf_counter()))
            if gate is None:
                return await _one(client, cfg, model, prompt, max_tokens)
            async with gate:
                return await _one(client, cfg, model, prompt, max_tokens)

        results = await asyncio.gather(*(scheduled(*item) for item in plan))
        duration = time.perf_counter() - started
    summary = summarize(list(results), duration)
    summary["config"] = {**asdict(cfg), "api_key": "***" if cfg.api_key else "", "model": model}
    return summary


def run_bench_serve(cfg: Config) -> dict:
    """Run the benchmark (blocking; call from code that is not inside an event loop)."""
    summary = asyncio.run(bench(cfg))
    if cfg.output:
        from ..core.io import atomic_write_json

        atomic_write_json(cfg.output, summary)
    return summary


def format_summary(summary: dict) -> str:
    rows = [f"requests: {summary['completed']} ok, {summary['failed']} failed in {summary['duration_s']:.2f} s",
            f"throughput: {summary['request_throughput']:.2f} req/s, {summary['output_tokens_per_s']:.1f} output "
            f"tok/s, {summary['total_tokens_per_s']:.1f} total tok/s",
            f"{'ms':<6}{'mean':>10}{'p50':>10}{'p90':>10}{'p99':>10}"]
    for key in ("ttft_ms", "tpot_ms", "itl_ms", "e2e_ms"):
        values = summary[key]
        cells = "".join(f"{values[q]:>10.2f}" if values[q] is not None else f"{'-':>10}"
                        for q in ("mean", "p50", "p90", "p99"))
        rows.append(f"{key[:-3].upper():<6}{cells}")
    if summary["errors"]:
        rows.append("errors: " + "; ".join(summary["errors"]))
    return "\n".join(rows)


def run(cfg: Config) -> dict:
    """`lmforge bench serve`: run and print the table."""
    summary = run_bench_serve(cfg)
    print(format_summary(summary))
    return summary
