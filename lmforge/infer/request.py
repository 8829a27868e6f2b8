"""Requests and their state: `SamplingParams` (what the caller asks for), `Sequence` (one sample being
generated, with its tokens, KV blocks and stop state), `Request` (a prompt and its n sequences), and the
records the engine hands back each step (`RequestOutput`, `CompletionOutput`, `RequestMetrics`).

Defaults follow the OpenAI API / vLLM (temperature 1, max_tokens 16), so the server can pass a request's
fields straight through; pass `temperature=0` for greedy decoding.
"""
from __future__ import annotations

import enum
from collections.abc import Sequence as SequenceABC
from dataclasses import dataclass, field

import torch

from ..core.errors import ConfigError
from .block_manager import BlockHash, hash_block
from .constrained import validate_constraint
from .detokenize import IncrementalDetokenizer


@dataclass
class SamplingParams:
    """How to generate for one request."""

    n: int = 1                             # samples per prompt (they share the prompt's cached blocks)
    max_tokens: int = 16                   # new tokens per sample
    min_tokens: int = 0                    # stop tokens are masked until this many were generated
    temperature: float = 1.0               # 0 = greedy
    top_k: int = 0                         # 0 = off
    top_p: float = 1.0
    min_p: float = 0.0                     # drop tokens less likely than min_p × the top token's probability
    repetition_penalty: float = 1.0        # HF/CTRL: divides positive, multiplies negative logits of seen tokens
    presence_penalty: float = 0.0          # OpenAI: minus this once for every token already generated
    frequency_penalty: float = 0.0         # OpenAI: minus this per occurrence in the generated tokens
    logit_bias: dict[int, float] | None = None
    seed: int | None = None                # per-request generator: same tokens whatever else is batched
    stop: list[str] | str | None = None    # stop strings (need a tokenizer); the text ends before them
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False
    include_stop_str_in_output: bool = False
    skip_special_tokens: bool = True
    logprobs: bool = False                 # return the log-probability of each sampled token
    top_logprobs: int = 0                  # and of the k most likely tokens at each step
    json_schema: dict | None = None        # constrained decoding: the output is JSON valid under this schema
    regex: str | None = None               # constrained decoding: the whole output matches this regex
    grammar: str | None = None             # constrained decoding: a Lark grammar (llguidance dialect, %json ok)

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop = [self.stop]

    def validate(self, vocab_size: int) -> None:
        """Raise ConfigError naming the first field outside its accepted range."""
        checks = [
            ("n", self.n >= 1, ">= 1"),
            ("max_tokens", self.max_tokens >= 1, ">= 1"),
            ("min_tokens", 0 <= self.min_tokens <= self.max_tokens, "in 0..max_tokens"),
            ("temperature", self.temperature >= 0.0, ">= 0"),
            ("top_k", self.top_k >= 0, ">= 0 (0 = off)"),
            ("top_p", 0.0 < self.top_p <= 1.0, "in (0, 1]"),
            ("min_p", 0.0 <= self.min_p <= 1.0, "in [0, 1]"),
            ("repetition_penalty", self.repetition_penalty > 0.0, "> 0"),
            ("presence_penalty", -2.0 <= self.presence_penalty <= 2.0, "in [-2, 2]"),
            ("frequency_penalty", -2.0 <= self.frequency_penalty <= 2.0, "in [-2, 2]"),
            ("top_logprobs", 0 <= self.top_logprobs <= min(20, vocab_size), "in 0..20"),
        ]
        for name, ok, accepted in checks:
            if not ok:
                raise ConfigError(f"SamplingParams.{name}={getattr(self, name)!r} must be {accepted}")
        for token_id in list(self.logit_bias or {}) + list(self.stop_token_ids or []):
            if not 0 <= int(token_id) < vocab_size:
                raise ConfigError(f"SamplingParams: token id {token_id} is outside the vocabulary "
                                  f"(0..{vocab_size - 1})")
        if any(not s for s in self.stop or []):
            raise ConfigError("SamplingParams.stop: stop strings must be non-empty")
        validate_constraint(self.json_schema, self.regex, self.grammar)

    @property
    def is_constrained(self) -> bool:
        return self.json_schema is not None or self.regex is not None or self.grammar is not None

    @property
    def is_greedy(self) -> bool:
        return self.temperature == 0.0


class SequenceStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass
class TokenLogprob:
    """Log-probability of a sampled token under the model (raw logits, before penalties and temperature)."""

    token_id: int
    logprob: float
    top_logprobs: dict[int, float] = field(default_factory=dict)


class Sequence:
    """One sample of a request: tokens, KV blocks, progress through prefill, and its output so far."""

    def __init__(
        self, seq_id: int, request: Request, index: int, detokenizer: IncrementalDetokenizer | None,
        generator: torch.Generator | None, block_size: int,
    ):
        self.seq_id = seq_id
        self.request = request
        self.index = index                      # which of the request's n samples
        self.token_ids: list[int] = list(request.prompt_token_ids)
        self.num_prompt_tokens = len(self.token_ids)
        self.num_computed_tokens = 0            # tokens whose KV is in the cache
        self.block_table: list[int] = []
        self.num_registered_blocks = 0          # leading full blocks already offered to the prefix cache
        self.block_hashes: list[BlockHash] = []
        self.block_size = block_size
        self.status = SequenceStatus.WAITING
        self.was_admitted = False               # its prompt was looked up in the prefix cache once
        self.detokenizer = detokenizer
        self.generator = generator
        self.matcher = None                     # grammar matcher of a constrained request (constrained.py)
        self.logprobs: list[TokenLogprob] = []
        self.cumulative_logprob = 0.0
        self.finish_reason: str | None = None   # "stop" | "length" | "abort"
        self.stop_reason: int | str | None = None  # the stop token id or stop string that ended it
        self.text = ""
        self.pending_text = ""                  # text produced since the last RequestOutput
        self.num_reported_tokens = 0
        self.update_block_hashes()

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens:]

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def is_finished(self) -> bool:
        return self.status is SequenceStatus.FINISHED

    def update_block_hashes(self) -> None:
        """Hash every full block of `token_ids` not hashed yet (each block once, as it fills)."""
        size = self.block_size
        hashes = self.block_hashes
        while (len(hashes) + 1) * size <= len(self.token_ids):
            start = len(hashes) * size
            hashes.append(hash_block(hashes[-1] if hashes else None, self.token_ids[start:start + size],
                                     self.request.cache_salt))

    def append_token(self, token_id: int) -> None:
        self.token_ids.append(token_id)
        if len(self.token_ids) % self.block_size == 0:
            self.update_block_hashes()


@dataclass
class RequestMetrics:
    """Timings (time.perf_counter seconds) and token counts of one request."""

    arrival_time: float
    num_prompt_tokens: int
    first_scheduled_time: float | None = None
    first_token_time: float | None = None
    last_token_time: float | None = None
    finished_time: float | None = None
    num_cached_tokens: int = 0            # prompt tokens whose prefill the prefix cache saved (first admission)
    num_generated_tokens: int = 0         # over all n samples
    num_decode_steps: int = 0             # tokens of the longest sample after its first

    @property
    def ttft(self) -> float | None:
        """Time to first token: arrival → first sampled token."""
        return None if self.first_token_time is None else self.first_token_time - self.arrival_time

    @property
    def tpot(self) -> float | None:
        """Time per output token after the first (mean inter-token gap, over the longest sample)."""
        if self.first_token_time is None or self.last_token_time is None or self.num_decode_steps < 1:
            return None
        return (self.last_token_time - self.first_token_time) / self.num_decode_steps


@dataclass
class CompletionOutput:
    """One sample's output so far: cumulative text/tokens, plus what is new since the last step."""

    index: int
    text: str
    token_ids: list[int]
    new_text: str
    new_token_ids: list[int]
    finish_reason: str | None
    stop_reason: int | str | None = None
    logprobs: list[TokenLogprob] | None = None
    cumulative_logprob: float | None = None


@dataclass
class RequestOutput:
    """What `LLMEngine.step()` returns for a request that advanced (or finished) in that step."""

    request_id: str
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool
    metrics: RequestMetrics


class Request:
    """A prompt, its parameters, its adapter and its `n` sequences."""

    def __init__(self, request_id: str, prompt_token_ids: SequenceABC[int], params: SamplingParams,
                 arrival_time: float, arrival_index: int, lora: str | None = None, cache_salt: bytes = b""):
        self.request_id = request_id
        self.prompt_token_ids = list(prompt_token_ids)
        self.params = params
        self.lora = lora                    # the LoRA adapter it runs with (None = the base model)
        self.cache_salt = cache_salt        # separates its prefix-cache blocks from other adapters'
        self.arrival_index = arrival_index  # FCFS order
        self.sequences: list[Sequence] = []
        self.metrics = RequestMetrics(arrival_time=arrival_time, num_prompt_tokens=len(self.prompt_token_ids))

    @property
    def is_finished(self) -> bool:
        return all(seq.is_finished for seq in self.sequences)

    def make_output(self) -> RequestOutput:
        """The cumulative state of every sample, with the text/tokens new since the previous call."""
        outputs = []
        for seq in self.sequences:
            new_ids = seq.token_ids[seq.num_prompt_tokens + seq.num_reported_tokens:]
            seq.num_reported_tokens = seq.num_output_tokens
            outputs.append(CompletionOutput(
                index=seq.index, text=seq.text, token_ids=seq.output_token_ids, new_text=seq.pending_text,
                new_token_ids=new_ids, finish_reason=seq.finish_reason, stop_reason=seq.stop_reason,
                logprobs=list(seq.logprobs) if self.params.logprobs else None,
                cumulative_logprob=seq.cumulative_logprob if self.params.logprobs else None,
            ))
            seq.pending_text = ""
        return RequestOutput(self.request_id, self.prompt_token_ids, outputs, self.is_finished, self.metrics)
