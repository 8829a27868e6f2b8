"""Constrained decoding in LLMEngine: JSON schema and regex outputs from a tiny RANDOM model (whose free
output is garbage) always parse, with greedy and temperature sampling, mixed with unconstrained requests
that stay exactly as they were, through preemption; bad constraints are refused with the field named."""
from __future__ import annotations

import json
import re
import sys

import pytest
import torch

from lmforge.core.errors import ConfigError
from lmforge.infer.constrained import GrammarCompiler
from lmforge.infer.detokenize import TokenBytes
from lmforge.infer.engine import LLMEngine
from lmforge.infer.request import SamplingParams
from lmforge.infer.sampling import RowSampling, sample_rows
from lmforge.model import ModelConfig, Transformer
from lmforge.tokenizer import TokenizerConfig, train_tokenizer

pytest.importorskip("llguidance")

_TEXTS = ['{"name": "Alice", "age": 30, "tags": ["a", "b"], "city": "北京", "ok": true}',
          "上海 深圳 北京 中文 名字 你好 世界 蓝色 红色", "the quick brown fox jumps over the lazy dog 0123456789",
          "2024-01-15 alice@example.com true false null [1, 2.5, -3]"] * 30

FLAT = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 8},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "color": {"enum": ["red", "green", "蓝色"]},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 4}, "maxItems": 3},
    },
    "required": ["name", "age", "color", "tags"],
    "additionalProperties": False,
}
NESTED = {
    "type": "object",
    "properties": {
        "user": {
            "type": "object",
            "properties": {"id": {"type": "integer", "minimum": 1, "maximum": 9999},
                           "active": {"type": "boolean"},
                           "名字": {"type": "string", "pattern": "^[\u4e00-\u9fff]{1,4}$"}},
            "required": ["id", "active", "名字"],
            "additionalProperties": False,
        },
        "items": {
            "type": "array", "minItems": 1, "maxItems": 2,
            "items": {"type": "object",
                      "properties": {"sku": {"type": "string", "maxLength": 5},
                                     "qty": {"type": "integer", "minimum": 1, "maximum": 9}},
                      "required": ["sku", "qty"], "additionalProperties": False},
        },
    },
    "required": ["user", "items"],
    "additionalProperties": False,
}
CHINESE = {
    "type": "object",
    "properties": {"city": {"enum": ["北京", "上海", "深圳"]}, "note": {"type": "string", "maxLength": 6}},
    "required": ["city", "note"],
    "additionalProperties": False,
}
REGEXES = [r"(19|20)[0-9]{2}-(0[1-9]|1[0-2])-[0-3][0-9]", r"[a-z]{3,6}@[a-z]{2,5}\.(com|org)",
           r"[北上深](京|海|圳)市?", r"(yes|no|maybe)"]


def conforms(value, schema: dict) -> bool:
    """The JSON-schema subset the tests use, checked by hand: type, enum, properties, required,
    additionalProperties, items, min/maxItems, minimum/maximum, maxLength, pattern."""
    if "enum" in schema:
        return value in schema["enum"]
    kind = schema.get("type")
    if kind == "object":
        props = schema.get("properties", {})
        if not isinstance(value, dict) or any(key not in value for key in schema.get("required", [])):
            return False
        if schema.get("additionalProperties") is False and set(value) - set(props):
            return False
        return all(conforms(v, props[k]) for k, v in value.items() if k in props)
    if kind == "array":
        return (isinstance(value, list) and schema.get("minItems", 0) <= len(value) <= schema.get("maxItems", 1 << 30)
                and all(conforms(v, schema["items"]) for v in value))
    if kind == "integer":
        return (isinstance(value, int) and not isinstance(value, bool)
                and schema.get("minimum", -1 << 62) <= value <= schema.get("maximum", 1 << 62))
    if kind == "boolean":
        return isinstance(value, bool)
    if kind == "string":
        return (isinstance(value, str) and len(value) <= schema.get("maxLength", 1 << 30)
                and ("pattern" not in schema or re.search(schema["pattern"], value) is not None))
    raise AssertionError(f"schema kind {kind!r} not covered by the test checker")


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: threads cost more than they give


@pytest.fixture(scope="module")
def tokenizer():
    return train_tokenizer(_TEXTS, TokenizerConfig(vocab_size=320, min_frequency=2))


def _random_model(vocab_size: int) -> Transformer:
    torch.manual_seed(0)
    config = ModelConfig(vocab_size=vocab_size, hidden_size=64, intermediate_size=96, num_layers=2, num_heads=4,
                         num_kv_heads=2, eos_token_id=None, max_position_embeddings=512)
    model = Transformer(config).eval()
    with torch.no_grad():  # large weights: the free output is far from JSON
        for param in model.parameters():
            param.normal_(0.0, 0.5)
    return model


@pytest.fixture(scope="module")
def model(tokenizer) -> Transformer:
    return _random_model(tokenizer.vocab_size)


def _engine(model, tokenizer, **kwargs) -> LLMEngine:
    kwargs.setdefault("max_model_len", 512)
    return LLMEngine(model, tokenizer, max_num_seqs=8, **kwargs)


def _texts(outputs) -> list[tuple[str, str]]:
    return [(c.text, c.finish_reason) for o in outputs for c in o.outputs]


def test_unconstrained_output_of_the_random_model_is_not_json(model, tokenizer):
    text = _engine(model, tokenizer).generate(["{"], SamplingParams(temperature=0, max_tokens=40))[0].outputs[0].text
    with pytest.raises(ValueError):
        json.loads("{" + text)


@pytest.mark.parametrize("schema", [FLAT, NESTED, CHINESE], ids=["flat", "nested", "chinese"])
def test_json_schema_outputs_always_parse_and_conform(model, tokenizer, schema):
    engine = _engine(model, tokenizer)
    prompts = ["hello", "北京", "{", "the quick"]
    params = [SamplingParams(temperature=0.0, max_tokens=300, json_schema=schema)] * 2 + [
        SamplingParams(temperature=1.0, seed=s, n=3, max_tokens=300, json_schema=schema) for s in (1, 2)]
    results = _texts(engine.generate(prompts, params))
    assert len(results) == 8
    for text, reason in results:
        assert reason == "stop", text
        assert conforms(json.loads(text), schema), text
    assert len({text for text, _ in results}) > 2  # sampling explores different valid outputs


def test_chinese_strings_come_out_whole(model, tokenizer):
    engine = _engine(model, tokenizer)
    params = SamplingParams(temperature=1.0, seed=5, n=4, max_tokens=300, json_schema=CHINESE)
    cities = {json.loads(text)["city"] for text, _ in _texts(engine.generate(["x"], params))}
    assert cities and cities <= {"北京", "上海", "深圳"}
    nested = SamplingParams(temperature=0.7, seed=9, n=3, max_tokens=300, json_schema=NESTED)
    for text, _ in _texts(engine.generate(["y"], nested)):
        assert re.fullmatch("[\u4e00-\u9fff]{1,4}", json.loads(text)["user"]["名字"])


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_regex_outputs_fullmatch(model, tokenizer, temperature):
    engine = _engine(model, tokenizer)
    params = [SamplingParams(temperature=temperature, seed=i, n=2, max_tokens=60, regex=r)
              for i, r in enumerate(REGEXES)]
    outputs = engine.generate(["a", "b", "c", "d"], params)
    for output, regex in zip(outputs, REGEXES):
        for completion in output.outputs:
            assert completion.finish_reason == "stop"
            assert re.fullmatch(regex, completion.text), (regex, completion.text)


def test_lark_grammar_with_an_embedded_json_schema(model, tokenizer):
    """SamplingParams.grammar (Lark, llguidance's dialect): text around JSON, as the server's forced tool calls."""
    grammar = ('start: "<call>" body "</call>" | "no call"\n'
               'body: %json {"type": "object", "properties": {"n": {"type": "integer", "minimum": 0, '
               '"maximum": 9}}, "required": ["n"], "additionalProperties": false}\n')
    engine = _engine(model, tokenizer)
    params = SamplingParams(temperature=1.0, seed=3, n=6, max_tokens=80, grammar=grammar)
    for text, reason in _texts(engine.generate(["z"], params)):
        assert reason == "stop", text
        if text != "no call":
            match = re.fullmatch(r"<call>(.*)</call>", text, re.DOTALL)
            assert match and 0 <= json.loads(match.group(1))["n"] <= 9, text


def test_unconstrained_requests_are_unchanged_by_constrained_neighbours(model, tokenizer):
    free = [SamplingParams(temperature=0.0, max_tokens=30), SamplingParams(temperature=0.9, seed=4, max_tokens=30),
            SamplingParams(temperature=0.8, top_p=0.9, seed=7, n=2, max_tokens=30)]
    prompts = ["hello", "北京 你好", "the quick brown"]
    alone = _texts(_engine(model, tokenizer).generate(prompts, free))
    engine = _engine(model, tokenizer)
    mixed_params = [free[0], SamplingParams(temperature=0.0, max_tokens=300, json_schema=FLAT), free[1],
                    SamplingParams(temperature=1.0, seed=3, max_tokens=60, regex=REGEXES[0]), free[2]]
    mixed = engine.generate([prompts[0], "x", prompts[1], "y", prompts[2]], mixed_params)
    assert _texts([mixed[0], mixed[2], mixed[4]]) == alone
    assert conforms(json.loads(mixed[1].outputs[0].text), FLAT)
    assert re.fullmatch(REGEXES[0], mixed[3].outputs[0].text)


def test_preemption_by_recompute_keeps_the_grammar_state(model, tokenizer):
    params = [SamplingParams(temperature=0.0, max_tokens=300, json_schema=NESTED),
              SamplingParams(temperature=1.0, seed=11, n=2, max_tokens=300, json_schema=FLAT),
              SamplingParams(temperature=0.0, max_tokens=60, regex=REGEXES[1]),
              SamplingParams(temperature=0.0, max_tokens=40)]
    prompts = ["hello there", "北京", "a b c", "the quick"]
    roomy = _texts(_engine(model, tokenizer).generate(prompts, params))
    tight = _engine(model, tokenizer, block_size=4, num_blocks=24, max_model_len=80)
    assert _texts(tight.generate(prompts, params)) == roomy
    assert tight.stats().num_preemptions > 0


def test_mask_equals_token_by_token_check_and_padding_ids_never_allowed(tokenizer):
    vocab = tokenizer.vocab_size + 13  # a model with padded embeddings
    token_bytes = TokenBytes(tokenizer)
    compiler = GrammarCompiler(tokenizer, token_bytes, vocab, {tokenizer.eos_id})
    matchers = compiler.matchers({"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"],
                                  "additionalProperties": False}, None, 2)
    assert matchers[1].consume_tokens(tokenizer.encode('{"a":1'))
    masks = compiler.allowed(matchers)
    assert masks.shape == (2, vocab) and masks.dtype == torch.bool
    for row, matcher in enumerate(matchers):  # the brute-force check is fine in a test
        valid = torch.tensor([bool(matcher.validate_tokens([t])) for t in range(tokenizer.vocab_size)])
        allowed = masks[row, :tokenizer.vocab_size]
        assert allowed.any() and not (allowed & ~valid).any()  # only tokens the grammar accepts
        assert not masks[row, tokenizer.vocab_size:].any()
    # Inside the object every valid token is allowed; at the start llguidance also drops "{" when the
    # forced text '{"a":' is covered by a longer token ('{"'), as the tokenizer itself would encode it.
    assert masks[1, :tokenizer.vocab_size].tolist() == [bool(matchers[1].validate_tokens([t]))
                                                        for t in range(tokenizer.vocab_size)]
    assert masks[1, tokenizer.eos_id] == False  # noqa: E712 (the object is not closed yet)
    assert masks[1, tokenizer.encode("}")[0]]


def test_sampler_applies_the_mask_and_the_grammar_beats_bans():
    logits = torch.tensor([[5.0, 1.0, 0.0, -1.0], [5.0, 1.0, 0.0, -1.0], [0.0, 0.0, 9.0, 0.0]])
    mask = torch.tensor([[False, False, True, True], [False, True, False, False]])
    rows = [RowSampling(), RowSampling(banned_token_ids=[1]), RowSampling(temperature=1.0)]
    picked = sample_rows(logits, rows, allowed=([0, 1], mask)).token_ids
    assert picked == [2, 1, 2]  # row 1: its only allowed token is banned, the grammar wins
    assert logits[0, 0] == 5.0  # the caller's logits are untouched
    draws = {sample_rows(logits[:1], [RowSampling(temperature=5.0, generator=torch.Generator().manual_seed(s))],
                         allowed=([0], mask[:1])).token_ids[0] for s in range(30)}
    assert draws == {2, 3}


def test_bad_constraints_are_refused_with_the_field_named(model, tokenizer, monkeypatch):
    engine = _engine(model, tokenizer)
    cases = [
        (SamplingParams(regex="[a-z"), "SamplingParams.regex"),
        (SamplingParams(json_schema={"type": "no-such-type"}), "SamplingParams.json_schema"),
        (SamplingParams(json_schema=["not", "a", "dict"]), "SamplingParams.json_schema"),
        (SamplingParams(regex=""), "SamplingParams.regex"),
        (SamplingParams(regex="a", json_schema={"type": "string"}), "set one of"),
        (SamplingParams(grammar="start: (unclosed"), "SamplingParams.grammar"),
        (SamplingParams(grammar="start: \"a\"", regex="a"), "set one of"),
    ]
    for params, expected in cases:
        with pytest.raises(ConfigError, match=re.escape(expected)):
            params.validate(tokenizer.vocab_size)  # what a server checks before it queues anything
        with pytest.raises(ConfigError, match=re.escape(expected)):
            engine.add_request("x", params)
    assert not engine.has_unfinished_requests()
    no_tokenizer = LLMEngine(model, None, max_num_seqs=2, max_model_len=64)
    with pytest.raises(ConfigError, match="tokenizer"):
        no_tokenizer.add_request([1, 2], SamplingParams(regex="a+"))
    monkeypatch.setitem(sys.modules, "llguidance", None)  # as if it were not installed
    with pytest.raises(ConfigError, match=re.escape("lmforge[serve]")):
        _engine(model, tokenizer).add_request("x", SamplingParams(json_schema={"type": "string"}))


def test_a_finished_grammar_stops_before_max_tokens_and_eos_ends_an_open_one(model, tokenizer):
    engine = _engine(model, tokenizer)
    done = engine.generate(["x"], SamplingParams(temperature=0, max_tokens=50, regex="(ab|cd)"))[0].outputs[0]
    assert done.text in ("ab", "cd") and done.finish_reason == "stop" and len(done.token_ids) <= 2
    # "a+" stays open: the engine may end only on EOS (allowed once the text matches) or max_tokens
    for completion in engine.generate(["y"], SamplingParams(temperature=2.0, seed=0, n=6, max_tokens=8,
                                                            regex="a+"))[0].outputs:
        assert re.fullmatch("a+", completion.text) or completion.finish_reason == "length"
        if completion.finish_reason == "stop":
            assert completion.token_ids[-1] == tokenizer.eos_id
