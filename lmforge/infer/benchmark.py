"""Generation speed: lmforge's `generate` vs transformers' `generate()` on the same weights, in one run.

What it reports, per precision (the model is cast to it; no autocast, on both sides):
- prefill tokens/s: prompt tokens / time to the first new token (a streamer callback on each side);
- decode tokens/s: (N - 1) / (time from the first new token to the N-th), batch 1, greedy;
- achieved bandwidth: bytes read per decoded token (every weight but the embedding table, plus one
  embedding row, plus the KV cache at the average context length) x decode tokens/s, against the
  machine's read bandwidth measured here as the best `sum()` over a tensor far larger than any cache
  (at the start and at the end of the run; the higher reading counts);
- ours with `compile=True` (the torch.compile'd decode step, compiled during the warm-up) as a third side;
- speculative decoding (ours only): acceptance rate, tokens per target forward and speed-up over plain
  greedy decoding, with a draft model (the target's first `draft_layers` layers plus its embedding,
  final norm and head: self-speculation, no second checkpoint needed) and with prompt lookup.

The sides take turns round by round so that drift in machine load hits both; medians are reported.
"""
from __future__ import annotations

import os
import statistics
import tempfile
import time
from dataclasses import dataclass, replace

import torch

from ..config import opt
from ..core.device import cpu_name
from ..core.errors import ConfigError


@dataclass
class GenerateBenchConfig:
    model: str = opt("", "model directory (HF layout); empty = a random Llama of the shape below")
    hidden_size: int = opt(768, "random model: hidden size")
    num_layers: int = opt(12, "random model: layers")
    num_heads: int = opt(12, "random model: attention heads")
    num_kv_heads: int = opt(0, "random model: key/value heads (0 = num_heads)")
    intermediate_size: int = opt(2048, "random model: MLP size")
    vocab_size: int = opt(32000, "random model: vocabulary")
    dtypes: list[str] = opt(["float32", "bfloat16"], "precisions to run (float32, bfloat16)")
    threads: int = opt(2, "torch intra-op threads (0 = leave torch's choice)")
    prompt_tokens: int = opt(128, "prompt length (random token ids)")
    new_tokens: int = opt(128, "tokens to generate per timed run")
    rounds: int = opt(3, "timed rounds per side (sides alternate); medians are reported")
    hf: bool = opt(True, "also time transformers' generate() on the same weights")
    compile: bool = opt(True, "also time generate(compile=True): the torch.compile'd decode step (compiles once, 10-20 s)")
    speculative: bool = opt(True, "also time speculative decoding (draft model and prompt lookup)")
    draft_layers: int = opt(2, "draft model = the target's first N layers (+ embedding, norm, head)")
    num_speculative_tokens: int = opt(4, "draft tokens per round")
    prompt_lookup_ngram: int = opt(3, "longest n-gram prompt lookup matches")
    bandwidth_mb: int = opt(512, "size of the tensor the read bandwidth is measured on (MB)")
    seed: int = opt(0, "seed for the random model and prompt")

    def validate(self) -> None:
        for name in self.dtypes:
            if name not in _DTYPES:
                raise ConfigError(f"dtypes: {name!r} is not one of {sorted(_DTYPES)}")
        if self.new_tokens < 2 or self.prompt_tokens < 1 or self.rounds < 1:
            raise ConfigError("new_tokens must be >= 2, prompt_tokens >= 1, rounds >= 1")


_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}


def measure_read_bandwidth(megabytes: int = 512, repeats: int = 7) -> float:
    """Bytes/s of the best `x.sum()` over a float32 tensor of `megabytes` (streams memory once)."""
    x = torch.ones(megabytes * (1 << 20) // 4, dtype=torch.float32)
    x.sum()
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        x.sum()
        best = min(best, time.perf_counter() - t0)
    return x.numel() * 4 / best


def bytes_per_token(model: torch.nn.Module, context: float) -> tuple[float, float]:
    """(weight bytes, KV bytes) one decode step reads at `context` cached tokens."""
    config = model.config
    embed = model.model.embed_tokens.weight
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    if model.lm_head.weight is not embed:  # an untied table is only gathered from: one row per token
        weights -= embed.numel() * embed.element_size() - embed.shape[1] * embed.element_size()
    kv = 2 * config.num_layers * config.num_kv_heads * config.head_dim_resolved * context * embed.element_size()
    return float(weights), float(kv)


def _random_model(cfg: GenerateBenchConfig):
    from ..model import ModelConfig, Transformer

    config = ModelConfig(model_type="llama", vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size,
                         intermediate_size=cfg.intermediate_size, num_layers=cfg.num_layers, num_heads=cfg.num_heads,
                         num_kv_heads=cfg.num_kv_heads or cfg.num_heads,
                         max_position_embeddings=max(2048, cfg.prompt_tokens + cfg.new_tokens),
                         tie_word_embeddings=False)
    torch.manual_seed(cfg.seed)
    return Transformer(config).eval()


def draft_from_layers(target: torch.nn.Module, num_layers: int) -> torch.nn.Module:
    """A draft model made of the target's first `num_layers` layers, embedding, final norm and head
    (copies of those weights)."""
    from ..model import Transformer

    config = replace(target.config, num_layers=num_layers)
    draft = Transformer(config).to(target.lm_head.weight.dtype).eval()
    draft.load_state_dict(target.state_dict(), strict=False)
    return draft


class _Clock:
    """Times one generate() call: when it started, when each new token came out."""

    def __init__(self):
        self.start = time.perf_counter()
        self.stamps: list[float] = []

    def tick(self, *_args) -> None:
        self.stamps.append(time.perf_counter())


class _HFStreamer(_Clock):
    """transformers' streamer interface: put() gets the prompt first, then each new token."""

    def __init__(self):
        super().__init__()
        self.seen_prompt = False

    def put(self, _value) -> None:
        if self.seen_prompt:
            self.tick()
        self.seen_prompt = True

    def end(self) -> None:
        pass


@dataclass
class _Timings:
    ttft: list[float]
    decode: list[float]  # seconds from the first new token to the last

    def add(self, clock: _Clock) -> None:
        self.ttft.append(clock.stamps[0] - clock.start)
        self.decode.append(clock.stamps[-1] - clock.stamps[0])

    def prefill_tps(self, prompt: int) -> float:
        return prompt / statistics.median(self.ttft)

    def decode_tps(self, new: int) -> float:
        return (new - 1) / statistics.median(self.decode)


def run_generate_bench(cfg: GenerateBenchConfig, log=print) -> dict:
    """Run the benchmark, print the tables, return the numbers (per dtype: ours/hf/speculative)."""
    from ..core.device import set_threads
    from ..model import Transformer
    from .generate import generate
    from .speculative import speculative_generate

    threads = set_threads(cfg.threads)
    log(f"# {time.strftime('%Y-%m-%d')}, {cpu_name()}, {os.cpu_count()} CPUs, torch {torch.__version__}, "
        f"threads={threads}, load average at start {os.getloadavg()[0]:.1f}")
    bandwidth = measure_read_bandwidth(cfg.bandwidth_mb)
    log(f"# read bandwidth: {bandwidth / 1e9:.1f} GB/s (best float32 sum over {cfg.bandwidth_mb} MB)")
    with tempfile.TemporaryDirectory() as tmp:
        if cfg.model:
            model_dir = cfg.model
            base = Transformer.from_pretrained(model_dir, dtype=torch.float32).eval()
        else:
            base = _random_model(cfg)
            model_dir = tmp
            base.save_pretrained(model_dir)
        log(f"# model: {base.num_params() / 1e6:.1f}M params (hidden {base.config.hidden_size}, "
            f"{base.config.num_layers} layers, {base.config.num_heads} heads, {base.config.num_kv_heads} kv heads, "
            f"intermediate {base.config.intermediate_size}, vocab {base.config.vocab_size}); "
            f"prompt {cfg.prompt_tokens}, new {cfg.new_tokens}, batch 1, greedy")
        prompt = torch.randint(0, base.config.vocab_size, (1, cfg.prompt_tokens),
                               generator=torch.Generator().manual_seed(cfg.seed + 1))
        del base
        results = {"bandwidth": bandwidth, "dtypes": {}}
        for name in cfg.dtypes:  # both sides load the same files, cast to the same dtype
            ours = Transformer.from_pretrained(model_dir, dtype=_DTYPES[name]).eval()
            r = results["dtypes"][name] = _bench_dtype(cfg, ours, model_dir, _DTYPES[name], prompt, generate,
                                                       speculative_generate)
            log(f"# {name}: " + ", ".join(f"{side} prefill {r[side]['prefill_tps']:.0f} / decode "
                                          f"{r[side]['decode_tps']:.1f} tok/s" for side in _SIDES if side in r)
                + f"; load average {os.getloadavg()[0]:.1f}")
            del ours
    # Neighbours' load only ever lowers the reading, so take the best of the start and the end.
    results["bandwidth"] = max(bandwidth, measure_read_bandwidth(cfg.bandwidth_mb))
    log(f"# read bandwidth at the end: best of both readings {results['bandwidth'] / 1e9:.1f} GB/s")
    _print_tables(cfg, results, log)
    log(f"# load average at end {os.getloadavg()[0]:.1f} (other processes on this machine distort timings)")
    return results


_SIDES = {"hf": "HF", "ours": "ours", "compiled": "ours, compile=True"}


def _bench_dtype(cfg, ours, model_dir, dtype, prompt, generate, speculative_generate) -> dict:
    def ours_generate(n: int, clock: _Clock | None = None):
        return generate(ours, prompt, n, on_token=clock.tick if clock else None)
    sides = {"ours": ours_generate}
    if cfg.compile:
        def compiled_generate(n: int, clock: _Clock | None = None):
            return generate(ours, prompt, n, on_token=clock.tick if clock else None, compile=True)
        sides["compiled"] = compiled_generate
    if cfg.hf:
        hf = _load_hf(model_dir, dtype)
        mask = torch.ones_like(prompt)

        def hf_generate(n: int, clock: _Clock | None = None):
            with torch.inference_mode():
                return hf.generate(prompt, attention_mask=mask, max_new_tokens=n, min_new_tokens=n, do_sample=False,
                                   pad_token_id=0, streamer=clock)
        sides["hf"] = hf_generate
    timings = {side: _Timings([], []) for side in sides}
    for fn in sides.values():  # warm up: allocations, oneDNN primitives, packing, compilation
        fn(2)
    names = list(sides)
    for r in range(cfg.rounds):
        for side in names if r % 2 == 0 else names[::-1]:
            clock = _HFStreamer() if side == "hf" else _Clock()
            sides[side](cfg.new_tokens, clock)
            timings[side].add(clock)
    weights, kv = bytes_per_token(ours, cfg.prompt_tokens + cfg.new_tokens / 2)
    out = {"bytes_per_token": weights + kv}
    for side, t in timings.items():
        out[side] = {"prefill_tps": t.prefill_tps(cfg.prompt_tokens), "decode_tps": t.decode_tps(cfg.new_tokens)}
    if "hf" in sides:
        out["hf"]["same_tokens"] = sides["hf"](16)[0, prompt.shape[1]:].tolist() == generate(ours, prompt, 16)[0]
    if "compiled" in sides:
        out["compiled"]["same_tokens"] = sides["compiled"](16) == generate(ours, prompt, 16)
    if cfg.speculative:
        out["speculative"] = _bench_speculative(cfg, ours, prompt, generate, speculative_generate)
    return out


def _bench_speculative(cfg, target, prompt, generate, speculative_generate) -> dict:
    draft = draft_from_layers(target, cfg.draft_layers)
    n = cfg.new_tokens
    runs = {
        "plain": lambda: (generate(target, prompt, n), None),
        f"draft ({cfg.draft_layers} layers)": lambda: (None, speculative_generate(
            target, prompt, n, draft=draft, num_speculative_tokens=cfg.num_speculative_tokens)),
        f"prompt lookup (n<={cfg.prompt_lookup_ngram})": lambda: (None, speculative_generate(
            target, prompt, n, prompt_lookup_ngram=cfg.prompt_lookup_ngram,
            num_speculative_tokens=cfg.num_speculative_tokens)),
    }
    times = {name: [] for name in runs}
    stats = {}
    for fn in runs.values():
        fn()
    for r in range(cfg.rounds):
        for name in list(runs) if r % 2 == 0 else list(runs)[::-1]:
            t0 = time.perf_counter()
            _, spec = runs[name]()
            times[name].append(time.perf_counter() - t0)
            if spec is not None:
                stats[name] = spec.stats
    plain = statistics.median(times["plain"])
    out = {}
    for name in runs:
        median = statistics.median(times[name])
        s = stats.get(name)
        out[name] = {"tps": n / median, "speedup": plain / median,
                     "acceptance": s.acceptance_rate if s else None,
                     "tokens_per_target_forward": s.tokens_per_target_forward if s else 1.0}
    return out


def _load_hf(model_dir: str, dtype: torch.dtype):
    try:
        import transformers
    except ImportError as e:
        raise ConfigError("hf=true needs transformers installed (pip install 'lmforge[hf]'), or pass hf=false") from e
    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    return transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype).eval()


def _print_tables(cfg: GenerateBenchConfig, results: dict, log) -> None:
    bandwidth = results["bandwidth"]
    log("")
    log("| precision | side | prefill tok/s | decode tok/s | decode ours/HF | MB read/token | achieved GB/s "
        "| % of read bandwidth |")
    log("|---|---|---|---|---|---|---|---|")
    for name, r in results["dtypes"].items():
        hf = r.get("hf")
        for side in ("hf", "ours", "compiled"):
            if side not in r:
                continue
            tps = r[side]["decode_tps"]
            achieved = tps * r["bytes_per_token"]
            ratio = f"{tps / hf['decode_tps']:.2f}x" if hf and side != "hf" else ("1.00x" if hf else "-")
            log(f"| {name} | {_SIDES[side]} | {r[side]['prefill_tps']:.0f} | {tps:.1f} | {ratio} "
                f"| {r['bytes_per_token'] / 1e6:.0f} | {achieved / 1e9:.1f} | {achieved / bandwidth:.0%} |")
    if cfg.speculative:
        log("")
        log("| precision | decoding | acceptance | tokens/target forward | tok/s | speed-up |")
        log("|---|---|---|---|---|---|")
        for name, r in results["dtypes"].items():
            for kind, s in r.get("speculative", {}).items():
                acc = f"{s['acceptance']:.0%}" if s["acceptance"] is not None else "-"
                log(f"| {name} | {kind} | {acc} | {s['tokens_per_target_forward']:.2f} | {s['tps']:.1f} "
                    f"| {s['speedup']:.2f}x |")
