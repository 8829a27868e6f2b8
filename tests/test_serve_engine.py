"""AsyncLLMEngine: same tokens as the synchronous engine, abort frees KV blocks, shutdown drains or aborts,
and neither a bad request nor a failing model step stops the worker."""
from __future__ import annotations

import asyncio
import threading

import pytest
import torch
from serve_support import random_model, tiny_tokenizer

from lmforge.core.errors import ConfigError
from lmforge.infer.engine import LLMEngine
from lmforge.infer.request import SamplingParams
from lmforge.serve.async_engine import AsyncLLMEngine, EngineClosedError, EngineStepError, wait_until


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: threads cost more than they give


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


@pytest.fixture(scope="module")
def model(tok):
    return random_model(tok)


def _engine(model, tok) -> LLMEngine:
    return LLMEngine(model, tok, max_num_seqs=4, block_size=8, max_num_batched_tokens=64)


def _greedy(max_tokens: int, **kw) -> SamplingParams:
    return SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True, **kw)


async def _collect(engine: AsyncLLMEngine, prompt, params):
    outputs = [out async for out in engine.generate(prompt, params)]
    return outputs


def test_async_matches_sync_engine(model, tok):
    prompts = ["the cat sat", "你好 世界", "weather in Paris"]
    expected = _engine(model, tok).generate(prompts, _greedy(12))
    engine = AsyncLLMEngine(_engine(model, tok))

    async def main():
        return await asyncio.gather(*(_collect(engine, p, _greedy(12)) for p in prompts))
    try:
        results = asyncio.run(main())
    finally:
        assert engine.shutdown(timeout=10)
    for outputs, want in zip(results, expected):
        assert outputs[-1].finished and not any(o.finished for o in outputs[:-1])
        assert outputs[-1].outputs[0].token_ids == want.outputs[0].token_ids
        assert "".join(o.outputs[0].new_text for o in outputs) == want.outputs[0].text


def test_closing_the_stream_aborts_and_frees_blocks(model, tok):
    sync = _engine(model, tok)
    free_at_start = sync.blocks.num_free_blocks
    engine = AsyncLLMEngine(sync)

    async def main():
        seen = 0
        stream = engine.generate("the cat sat on a mat " * 3, _greedy(200))
        async for _ in stream:
            seen += 1
            if seen == 3:
                break
        await stream.aclose()
        return seen
    try:
        assert asyncio.run(main()) == 3
        assert wait_until(lambda: not sync.has_unfinished_requests() and sync.blocks.num_free_blocks == free_at_start)
        assert engine.snapshot.num_running == 0
    finally:
        engine.shutdown(timeout=10)


def test_shutdown_drains_requests_in_flight(model, tok):
    engine = AsyncLLMEngine(_engine(model, tok))

    async def main():
        first = asyncio.Event()
        outputs = []

        async def consume():
            async for out in engine.generate("hello world", _greedy(30)):
                outputs.append(out)
                first.set()
        task = asyncio.ensure_future(consume())
        await first.wait()
        stopped = asyncio.ensure_future(engine.shutdown_async(drain=True, timeout=30))
        await task
        assert await stopped
        with pytest.raises(EngineClosedError):
            await _collect(engine, "too late", _greedy(2))
        return outputs
    outputs = asyncio.run(main())
    final = outputs[-1].outputs[0]
    assert outputs[-1].finished and final.finish_reason == "length" and len(final.token_ids) == 30
    assert not engine.is_running


def test_shutdown_without_drain_aborts(model, tok):
    sync = _engine(model, tok)
    engine = AsyncLLMEngine(sync)

    async def main():
        started = asyncio.Event()
        count = 0

        async def consume():
            nonlocal count
            async for _ in engine.generate("hello world", _greedy(200)):
                count += 1
                started.set()
        task = asyncio.ensure_future(consume())
        await started.wait()
        await engine.shutdown_async(drain=False, timeout=30)
        await asyncio.wait_for(task, 10)  # the stream ends (aborted) instead of hanging
        return count
    assert asyncio.run(main()) < 200
    assert not sync.has_unfinished_requests()
    assert sync.blocks.num_free_blocks == sync.blocks.num_blocks


def test_bad_request_and_failed_step_keep_the_worker_alive(model, tok, monkeypatch):
    sync = _engine(model, tok)
    engine = AsyncLLMEngine(sync)

    async def main():
        with pytest.raises(ConfigError, match="max_model_len"):
            await _collect(engine, list(range(5)) * 100, _greedy(4))
        real_step = sync.step
        calls = {"n": 0}

        def failing_step():
            calls["n"] += 1
            if calls["n"] == 1:
                raise RuntimeError("simulated kernel failure")
            return real_step()
        monkeypatch.setattr(sync, "step", failing_step)
        with pytest.raises(EngineStepError, match="simulated"):
            await _collect(engine, "the cat", _greedy(4))
        good = await _collect(engine, "the cat", _greedy(4))
        assert len(good[-1].outputs[0].token_ids) == 4
        vectors = await engine.call(lambda eng: eng.max_model_len)
        assert vectors == sync.max_model_len
    try:
        asyncio.run(main())
    finally:
        engine.shutdown(timeout=10)
    assert sync.blocks.num_free_blocks == sync.blocks.num_blocks


def test_requests_from_several_threads(model, tok):
    """Each client thread runs its own event loop; outputs go back to the right loop."""
    engine = AsyncLLMEngine(_engine(model, tok))
    results: dict[int, list[int]] = {}

    def client(i: int) -> None:
        outputs = asyncio.run(_collect(engine, f"the cat {i}", _greedy(6)))
        results[i] = outputs[-1].outputs[0].token_ids
    threads = [threading.Thread(target=client, args=(i,)) for i in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    engine.shutdown(timeout=10)
    assert sorted(results) == [0, 1, 2] and all(len(v) == 6 for v in results.values())


def test_a_crashed_worker_fails_requests_and_reports_unhealthy(model, tok, monkeypatch):
    engine = AsyncLLMEngine(_engine(model, tok))
    assert engine.healthy  # not started yet counts as healthy

    def broken_publish():
        raise RuntimeError("bug in the loop")
    monkeypatch.setattr(engine, "_publish", broken_publish)

    async def main():
        with pytest.raises(EngineStepError, match="bug in the loop"):
            await _collect(engine, "the cat", _greedy(4))
        with pytest.raises(EngineClosedError):
            await _collect(engine, "again", _greedy(4))
    asyncio.run(main())
    assert wait_until(lambda: not engine.is_running)
    assert not engine.healthy and "bug in the loop" in engine.crashed
