"""From an OpenAI request to engine inputs, and from engine outputs back to OpenAI fields.

`ServeContext` is what every route needs (engine, tokenizer, served names, limits); `sampling_params`
maps request fields to `SamplingParams` with the server's bounds applied; `check_lengths` refuses prompts
and `max_tokens` that do not fit; the logprob helpers write the two OpenAI logprob shapes (legacy
completions' parallel lists, chat's `content` list of objects).
"""
from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, fields
from typing import Any

from ..core.errors import ConfigError
from ..infer.request import RequestOutput, SamplingParams, TokenLogprob
from .async_engine import AsyncLLMEngine, RequestStream
from .guard import ServeLimits
from .protocol import APIError, SamplingFields


class ModelRegistry:
    """Served model names: the base model and the engine's LoRA adapters, looked up by name only."""

    def __init__(self, base_name: str, async_engine: AsyncLLMEngine):
        self.base_name = base_name
        self.engine = async_engine.engine

    def adapters(self) -> list[str]:
        lora_names = getattr(self.engine, "lora_names", None)
        return list(lora_names()) if callable(lora_names) else []

    def names(self) -> list[str]:
        return [self.base_name, *self.adapters()]

    def resolve(self, name: str | None) -> dict[str, Any]:
        """Extra add_request arguments for model `name` (none for the base model); 404 when unknown."""
        if name is None or name == self.base_name:
            return {}
        if name in self.adapters():
            return {"lora": name}
        raise APIError(404, f"the model {name!r} does not exist; served models: {self.names()}",
                       "invalid_request_error", "model", "model_not_found")


@dataclass
class ServeContext:
    async_engine: AsyncLLMEngine
    tokenizer: Any
    models: ModelRegistry
    limits: ServeLimits

    @property
    def engine(self):
        return self.async_engine.engine

    @property
    def max_model_len(self) -> int:
        return self.engine.max_model_len


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def now() -> int:
    return int(time.time())


def supports_constraints() -> bool:
    return "json_schema" in {f.name for f in fields(SamplingParams)}


def sampling_params(ctx: ServeContext, req: SamplingFields, max_tokens: int, logprobs: bool, top_logprobs: int,
                    extra_stop_token_ids: Sequence[int] = (),
                    constraint: dict[str, Any] | None = None) -> SamplingParams:
    """SamplingParams for a request, validated against the vocabulary (bad values → 400 naming the field)."""
    if req.n > ctx.limits.max_n:
        raise APIError(400, f"n={req.n} is above this server's limit of {ctx.limits.max_n}", param="n")
    logit_bias = None
    vocab = ctx.engine.config.vocab_size
    if req.logit_bias:
        logit_bias = {}
        for key, value in req.logit_bias.items():
            if not key.lstrip("-").isdigit():
                raise APIError(400, f"logit_bias key {key!r} is not a token id", param="logit_bias")
            if not 0 <= int(key) < vocab:
                raise APIError(400, f"logit_bias key {key} is outside the vocabulary (0..{vocab - 1})",
                               param="logit_bias")
            if not -100.0 <= value <= 100.0:
                raise APIError(400, f"logit_bias[{key}]={value} must be in [-100, 100]", param="logit_bias")
            logit_bias[int(key)] = float(value)
    stop_token_ids = list(req.stop_token_ids or []) + [t for t in extra_stop_token_ids if t is not None]
    stop = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
    if len(stop) > 16:
        raise APIError(400, f"stop has {len(stop)} strings; at most 16 are accepted", param="stop")
    kwargs: dict[str, Any] = dict(
        n=req.n, max_tokens=max_tokens, min_tokens=min(req.min_tokens, max_tokens), temperature=req.temperature,
        top_k=req.top_k, top_p=req.top_p, min_p=req.min_p, repetition_penalty=req.repetition_penalty,
        presence_penalty=req.presence_penalty, frequency_penalty=req.frequency_penalty, logit_bias=logit_bias,
        seed=req.seed, stop=stop or None, stop_token_ids=sorted(set(stop_token_ids)) or None,
        ignore_eos=req.ignore_eos, include_stop_str_in_output=req.include_stop_str_in_output,
        skip_special_tokens=req.skip_special_tokens, logprobs=logprobs, top_logprobs=top_logprobs,
    )
    if constraint:
        if not supports_constraints():
            raise APIError(400, "response_format needs constrained decoding, which this engine build lacks",
                           param="response_format", code="unsupported_parameter")
        kwargs.update(constraint)
    params = SamplingParams(**kwargs)
    try:
        params.validate(vocab)
    except ConfigError as e:
        raise APIError(400, str(e)) from None
    return params


def check_lengths(ctx: ServeContext, num_prompt_tokens: int, max_tokens: int | None, default_to_fill: bool) -> int:
    """The max_tokens to use; 400 when the prompt or max_tokens do not fit the model or the server's limits."""
    limit = ctx.limits.max_prompt_tokens or ctx.max_model_len - 1
    limit = min(limit, ctx.max_model_len - 1)
    if num_prompt_tokens == 0:
        raise APIError(400, "the prompt is empty", param="prompt")
    if num_prompt_tokens > limit:
        raise APIError(400, f"the prompt has {num_prompt_tokens} tokens; this server accepts at most {limit}",
                       param="messages" if default_to_fill else "prompt", code="context_length_exceeded")
    room = ctx.max_model_len - num_prompt_tokens
    cap = ctx.limits.max_tokens or ctx.max_model_len
    if max_tokens is None:
        max_tokens = min(room, cap) if default_to_fill else min(16, room, cap)
    if max_tokens > cap:
        raise APIError(400, f"max_tokens={max_tokens} is above this server's limit of {cap}", param="max_tokens")
    if max_tokens > room:
        raise APIError(400, f"max_tokens={max_tokens} plus the prompt's {num_prompt_tokens} tokens is more than "
                            f"the model's context of {ctx.max_model_len} tokens", param="max_tokens",
                       code="context_length_exceeded")
    return max_tokens


def check_tokens(ctx: ServeContext, ids: Sequence[int], param: str) -> list[int]:
    vocab = ctx.engine.config.vocab_size
    ids = list(ids)
    if not all(isinstance(t, int) and 0 <= t < vocab for t in ids):
        raise APIError(400, f"{param}: token ids must be in 0..{vocab - 1}", param=param)
    return ids


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def finish_reason(reason: str | None) -> str | None:
    return None if reason is None else ("stop" if reason == "abort" else reason)


# ---- logprobs ---------------------------------------------------------------------------------------------

def token_text(ctx: ServeContext, token_id: int) -> tuple[str, list[int]]:
    """A token's text (invalid UTF-8 shown as U+FFFD) and its raw bytes, as OpenAI reports them."""
    token_bytes = ctx.engine.token_bytes
    raw = token_bytes(token_id, skip_special_tokens=False) if token_bytes is not None else b""
    return raw.decode("utf-8", errors="replace"), list(raw)


def chat_logprobs(ctx: ServeContext, items: Sequence[TokenLogprob], top: int) -> list[dict[str, Any]]:
    """Chat's `logprobs.content` entries."""
    content = []
    for item in items:
        text, raw = token_text(ctx, item.token_id)
        alternatives = []
        for token_id, logprob in sorted(item.top_logprobs.items(), key=lambda kv: -kv[1])[:top]:
            alt_text, alt_raw = token_text(ctx, token_id)
            alternatives.append({"token": alt_text, "logprob": logprob, "bytes": alt_raw})
        content.append({"token": text, "logprob": item.logprob, "bytes": raw, "top_logprobs": alternatives})
    return content


def completion_logprobs(ctx: ServeContext, items: Sequence[TokenLogprob], top: int, offset: int) -> dict[str, Any]:
    """Legacy completions' `logprobs`: tokens, token_logprobs, top_logprobs, text_offset."""
    tokens, token_logprobs, tops, offsets = [], [], [], []
    for item in items:
        text, _ = token_text(ctx, item.token_id)
        tokens.append(text)
        token_logprobs.append(item.logprob)
        ranked = sorted(item.top_logprobs.items(), key=lambda kv: -kv[1])[:top]
        tops.append({token_text(ctx, t)[0]: lp for t, lp in ranked} if top else None)
        offsets.append(offset)
        offset += len(text)
    return {"tokens": tokens, "token_logprobs": token_logprobs, "top_logprobs": tops, "text_offset": offsets}


# ---- running requests -------------------------------------------------------------------------------------

async def submit_all(ctx: ServeContext, jobs: list[tuple[list[int], SamplingParams, dict[str, Any]]],
                     ) -> list[RequestStream]:
    """Queue every job and wait until the engine accepted each; what it refuses is a 400 here, before a
    response (or a stream) starts, and the jobs already accepted are aborted."""
    streams: list[RequestStream] = []
    try:
        for prompt, params, kwargs in jobs:
            streams.append(await ctx.async_engine.submit(prompt, params, new_id("req"), **kwargs))
    except BaseException as e:
        for stream in streams:
            await stream.aclose()
        if isinstance(e, ConfigError):
            raise APIError(400, str(e)) from None
        raise
    return streams


async def merge_outputs(streams: list[RequestStream]) -> AsyncIterator[tuple[int, RequestOutput]]:
    """(stream index, output) for several requests as they progress; closing it aborts the unfinished."""
    if len(streams) == 1:
        try:
            async for output in streams[0]:
                yield 0, output
        finally:
            await streams[0].aclose()
        return
    queue: asyncio.Queue = asyncio.Queue()
    done = object()

    async def pump(index: int, stream: RequestStream) -> None:
        try:
            async for output in stream:
                queue.put_nowait((index, output))
            queue.put_nowait((index, done))
        except Exception as e:  # noqa: BLE001 - re-raised by the consumer
            queue.put_nowait((index, e))

    tasks = [asyncio.ensure_future(pump(i, stream)) for i, stream in enumerate(streams)]
    try:
        remaining = len(streams)
        while remaining:
            index, item = await queue.get()
            if item is done:
                remaining -= 1
            elif isinstance(item, Exception):
                raise item
            else:
                yield index, item
    finally:
        for task in tasks:
            task.cancel()
        for stream in streams:
            await stream.aclose()


@dataclass
class EventStream:
    """A streaming answer: its SSE lines, and the engine requests to abort if it ends early."""

    events: AsyncIterator[str]
    streams: list[RequestStream]

    async def close(self) -> None:
        for stream in self.streams:
            await stream.aclose()


async def collect_or_abort(request, streams: list[RequestStream], coro):
    """Await a non-streaming answer; whatever happens (client gone, error), no request is left running."""
    try:
        return await unless_disconnected(request, coro)
    finally:
        for stream in streams:
            await stream.aclose()


async def unless_disconnected(request, coro, poll: float = 0.2):
    """Await `coro`, cancelling it (and so aborting its engine requests) if the client goes away."""
    task = asyncio.ensure_future(coro)
    try:
        while True:
            done, _ = await asyncio.wait({task}, timeout=poll)
            if done:
                return task.result()
            if await request.is_disconnected():
                task.cancel()
                raise APIError(499, "the client closed the connection", "client_closed_request")
    finally:
        if not task.done():
            task.cancel()
