"""POST /v1/chat/completions: messages through the chat template, tools, response_format, streaming."""
from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

from ..core.errors import LMForgeError
from ..tokenizer.chat_template import ChatTemplateError
from .completions import SSE_DONE, sse, stream_error
from .params import (
    EventStream,
    ServeContext,
    chat_logprobs,
    check_lengths,
    collect_or_abort,
    finish_reason,
    merge_outputs,
    new_id,
    now,
    sampling_params,
    submit_all,
    usage,
)
from .protocol import APIError, ChatCompletionRequest
from .tools import ToolStreamSplitter, active_tools, build_messages, forced_call_grammar, parse_tool_calls


def _constraint(req: ChatCompletionRequest) -> dict[str, Any] | None:
    """SamplingParams fields for response_format (json_object = any JSON object)."""
    fmt = req.response_format
    if fmt is None or fmt.type == "text":
        return None
    if fmt.type == "json_object":
        return {"json_schema": {"type": "object"}}
    if fmt.json_schema is None or fmt.json_schema.schema_ is None:
        raise APIError(400, "response_format.json_schema.schema is required for type json_schema",
                       param="response_format.json_schema")
    return {"json_schema": fmt.json_schema.schema_}


def _choice_name(req: ChatCompletionRequest) -> str:
    choice = req.tool_choice
    return repr(choice) if isinstance(choice, str) else f"function {choice.function.name!r}"


def _stop_token_ids(ctx: ServeContext) -> list[int]:
    """Turn ends: the tokenizer's EOS and ChatML's <|im_end|> where the vocabulary has them."""
    tok = ctx.tokenizer
    ids = [tok.eos_id, tok.token_to_id("<|im_end|>")]
    return [i for i in ids if i is not None]


def prepare(ctx: ServeContext, req: ChatCompletionRequest) -> tuple[list[int], Any, dict[str, Any], set[str]]:
    """(prompt ids, SamplingParams, extra add_request arguments, names of the tools offered)."""
    extra = ctx.models.resolve(req.model)
    if req.top_logprobs and not req.logprobs:
        raise APIError(400, "top_logprobs needs logprobs=true", param="top_logprobs")
    tools = active_tools(req)
    template = ctx.tokenizer.chat_template
    if template is None:
        raise APIError(400, f"the model {ctx.models.base_name!r} has no chat template; use /v1/completions",
                       param="messages")
    messages, template_tools = build_messages(req, template)
    try:
        ids = ctx.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tools=template_tools,
                                                tokenize=True)
    except ChatTemplateError as e:
        raise APIError(400, f"the chat template could not render these messages: {e}", param="messages") from None
    requested = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
    max_tokens = check_lengths(ctx, len(ids), requested, default_to_fill=True)
    constraint = _constraint(req)
    forced = forced_call_grammar(req, tools)
    if forced is not None:
        if constraint is not None:
            raise APIError(400, f"tool_choice={_choice_name(req)} forces a tool call, which cannot be combined "
                                "with response_format", param="tool_choice")
        constraint = {"grammar": forced}
    params = sampling_params(ctx, req, max_tokens, req.logprobs, req.top_logprobs or 0,
                             _stop_token_ids(ctx), constraint)
    return ids, params, extra, {t["function"]["name"] for t in tools}


async def create_chat_completion(ctx: ServeContext, req: ChatCompletionRequest,
                                 request) -> dict[str, Any] | EventStream:
    ids, params, extra, tool_names = prepare(ctx, req)
    request_id, created = new_id("chatcmpl"), now()
    model = req.model or ctx.models.base_name
    streams = await submit_all(ctx, [(ids, params, extra)])
    if req.stream:
        return EventStream(_stream(ctx, req, streams, tool_names, request_id, created, model), streams)
    answer = _collect(ctx, req, streams, tool_names, request_id, created, model)
    return await collect_or_abort(request, streams, answer)


async def _collect(ctx, req, streams, tool_names, request_id, created, model) -> dict[str, Any]:
    final = None
    async for _, output in merge_outputs(streams):
        final = output
    if final is None or not final.finished:
        raise APIError(503, "the request was aborted before it finished (the server is shutting down)",
                       "server_error", code="aborted")
    choices = []
    for completion in final.outputs:
        message: dict[str, Any] = {"role": "assistant", "content": completion.text}
        reason = finish_reason(completion.finish_reason)
        if tool_names:
            parsed = parse_tool_calls(completion.text, tool_names)
            message["content"] = parsed.content
            if parsed.tool_calls:
                message["tool_calls"] = parsed.tool_calls
                reason = "tool_calls"
        logprobs = None
        if req.logprobs:
            logprobs = {"content": chat_logprobs(ctx, completion.logprobs or [], req.top_logprobs or 0)}
        choices.append({"index": completion.index, "message": message, "logprobs": logprobs, "finish_reason": reason})
    completion_tokens = sum(len(c.token_ids) for c in final.outputs)
    return {"id": request_id, "object": "chat.completion", "created": created, "model": model, "choices": choices,
            "usage": usage(len(final.prompt_token_ids), completion_tokens), "system_fingerprint": None}


async def _stream(ctx, req, streams, tool_names, request_id, created, model) -> AsyncIterator[str]:
    include_usage = bool(req.stream_options and req.stream_options.include_usage)
    base = {"id": request_id, "object": "chat.completion.chunk", "created": created, "model": model,
            "system_fingerprint": None}
    extra = {"usage": None} if include_usage else {}

    def chunk(index: int, delta: dict[str, Any], logprobs=None, reason=None) -> str:
        return sse({**base, "choices": [{"index": index, "delta": delta, "logprobs": logprobs,
                                         "finish_reason": reason}], **extra})

    splitters = {i: ToolStreamSplitter(tool_names) for i in range(req.n)} if tool_names else {}
    sent_logprobs = [0] * req.n
    finished: set[int] = set()
    try:
        for index in range(req.n):
            yield chunk(index, {"role": "assistant", "content": ""})
        final = None
        async for _, output in merge_outputs(streams):
            final = output
            for completion in output.outputs:
                index = completion.index
                if index in finished:
                    continue
                text = completion.new_text
                if splitters:
                    text = splitters[index].push(text)
                logprobs = None
                if req.logprobs:
                    items = (completion.logprobs or [])[sent_logprobs[index]:]
                    sent_logprobs[index] += len(items)
                    logprobs = {"content": chat_logprobs(ctx, items, req.top_logprobs or 0)} if items else None
                reason = finish_reason(completion.finish_reason)
                if text or logprobs or completion.new_token_ids:  # a token with no text yet still ticks
                    yield chunk(index, {"content": text}, logprobs)
                if reason is None:
                    continue
                finished.add(index)
                if splitters:
                    parsed = splitters[index].finish()
                    if parsed.content:
                        yield chunk(index, {"content": parsed.content})
                    if parsed.tool_calls:
                        calls = [{"index": k, **call} for k, call in enumerate(parsed.tool_calls)]
                        yield chunk(index, {"tool_calls": calls})
                        reason = "tool_calls"
                yield chunk(index, {}, None, reason)
        if include_usage and final is not None:
            completion_tokens = sum(len(c.token_ids) for c in final.outputs)
            yield sse({**base, "choices": [], "usage": usage(len(final.prompt_token_ids), completion_tokens)})
    except (APIError, LMForgeError) as e:
        yield stream_error(e)
    yield SSE_DONE
