"""POST /v1/completions: one or more prompts (text or token ids), n samples each, streamed or not."""
from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

from ..core.errors import LMForgeError
from .params import (
    EventStream,
    ServeContext,
    check_lengths,
    check_tokens,
    collect_or_abort,
    completion_logprobs,
    finish_reason,
    merge_outputs,
    new_id,
    now,
    sampling_params,
    submit_all,
    usage,
)
from .protocol import APIError, CompletionRequest, error_body

SSE_DONE = "data: [DONE]\n\n"


def sse(obj: dict[str, Any]) -> str:
    """One server-sent event; non-ASCII stays as UTF-8 (the response is encoded as a whole)."""
    return "data: " + json.dumps(obj, ensure_ascii=False) + "\n\n"


def stream_error(error: Exception) -> str:
    status = error.status if isinstance(error, APIError) else 500
    message = error.message if isinstance(error, APIError) else str(error)
    kind = "invalid_request_error" if status < 500 else "server_error"
    return sse({**error_body(message, kind), "status": status})


def _prompts(ctx: ServeContext, prompt: Any) -> list[tuple[str, list[int]]]:
    """(text, token ids) per prompt; BOS is prepended to text prompts when the tokenizer has its own."""
    tok = ctx.tokenizer
    if isinstance(prompt, str):
        prompt = [prompt]
    if not prompt:
        raise APIError(400, "prompt is empty", param="prompt")
    if all(isinstance(p, int) for p in prompt):
        prompt = [prompt]
    bos = [tok.bos_id] if tok.bos_id is not None and tok.bos_id != tok.eos_id else []
    out = []
    for i, item in enumerate(prompt):
        if isinstance(item, str):
            out.append((item, bos + tok.encode(item)))
        else:
            ids = check_tokens(ctx, item, f"prompt[{i}]")
            out.append((tok.decode(ids), ids))
    return out


def prepare(ctx: ServeContext, req: CompletionRequest):
    if req.suffix:
        raise APIError(400, "suffix (insertion) is not supported", param="suffix", code="unsupported_parameter")
    if req.best_of is not None and req.best_of != req.n:
        raise APIError(400, "best_of other than n is not supported", param="best_of", code="unsupported_parameter")
    extra = ctx.models.resolve(req.model)
    prompts = _prompts(ctx, req.prompt)
    if len(prompts) > ctx.limits.max_prompts:
        raise APIError(400, f"{len(prompts)} prompts in one request; the limit is {ctx.limits.max_prompts}",
                       param="prompt")
    jobs = []
    for _, ids in prompts:
        max_tokens = check_lengths(ctx, len(ids), req.max_tokens, default_to_fill=False)
        params = sampling_params(ctx, req, max_tokens, req.logprobs is not None, req.logprobs or 0)
        jobs.append((ids, params, extra))
    return prompts, jobs


async def create_completion(ctx: ServeContext, req: CompletionRequest, request) -> dict[str, Any] | EventStream:
    prompts, jobs = prepare(ctx, req)
    request_id, created = new_id("cmpl"), now()
    model = req.model or ctx.models.base_name
    streams = await submit_all(ctx, jobs)
    if req.stream:
        return EventStream(_stream(ctx, req, prompts, streams, request_id, created, model), streams)
    answer = _collect(ctx, req, prompts, streams, request_id, created, model)
    return await collect_or_abort(request, streams, answer)


async def _collect(ctx, req, prompts, streams, request_id, created, model) -> dict[str, Any]:
    finals = {}
    async for index, output in merge_outputs(streams):
        if output.finished:
            finals[index] = output
    if len(finals) < len(streams):
        raise APIError(503, "the request was aborted before it finished (the server is shutting down)",
                       "server_error", code="aborted")
    choices, prompt_tokens, completion_tokens = [], 0, 0
    for index in range(len(streams)):
        output = finals[index]
        prompt_tokens += len(output.prompt_token_ids)
        prefix = prompts[index][0] if req.echo else ""
        for completion in output.outputs:
            completion_tokens += len(completion.token_ids)
            logprobs = None
            if req.logprobs is not None:
                logprobs = completion_logprobs(ctx, completion.logprobs or [], req.logprobs, len(prefix))
            choices.append({"index": index * req.n + completion.index, "text": prefix + completion.text,
                            "logprobs": logprobs, "finish_reason": finish_reason(completion.finish_reason)})
    return {"id": request_id, "object": "text_completion", "created": created, "model": model,
            "choices": choices, "usage": usage(prompt_tokens, completion_tokens), "system_fingerprint": None}


async def _stream(ctx, req, prompts, streams, request_id, created, model) -> AsyncIterator[str]:
    include_usage = bool(req.stream_options and req.stream_options.include_usage)
    sent_logprobs: dict[int, int] = {}
    finished: set[int] = set()
    text_offset: dict[int, int] = {}
    prompt_tokens = completion_tokens = 0
    base = {"id": request_id, "object": "text_completion", "created": created, "model": model}
    try:
        async for index, output in merge_outputs(streams):
            for completion in output.outputs:
                choice = index * req.n + completion.index
                if choice in finished:
                    continue
                text = completion.new_text
                if req.echo and choice not in text_offset:
                    text = prompts[index][0] + text
                logprobs = None
                if req.logprobs is not None:
                    items = (completion.logprobs or [])[sent_logprobs.get(choice, 0):]
                    sent_logprobs[choice] = sent_logprobs.get(choice, 0) + len(items)
                    logprobs = completion_logprobs(ctx, items, req.logprobs, text_offset.get(choice, 0))
                text_offset[choice] = text_offset.get(choice, 0) + len(text)
                reason = finish_reason(completion.finish_reason)
                if not text and reason is None and not completion.new_token_ids:
                    continue  # nothing new for this choice (another sample of the request moved)
                if reason is not None:
                    finished.add(choice)
                chunk = {**base, "choices": [{"index": choice, "text": text, "logprobs": logprobs,
                                              "finish_reason": reason}]}
                if include_usage:
                    chunk["usage"] = None
                yield sse(chunk)
            if output.finished:
                prompt_tokens += len(output.prompt_token_ids)
                completion_tokens += sum(len(c.token_ids) for c in output.outputs)
        if include_usage:
            yield sse({**base, "choices": [], "usage": usage(prompt_tokens, completion_tokens)})
    except (APIError, LMForgeError) as e:
        yield stream_error(e)
    yield SSE_DONE
