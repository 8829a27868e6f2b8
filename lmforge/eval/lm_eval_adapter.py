"""lmforge models inside EleutherAI's lm-evaluation-harness (`lm_eval`): the model type "lmforge".

    lm_eval --model lmforge \\
        --model_args pretrained=runs/pretrain/model,adapter=runs/sft/adapter,dtype=float32,batch_size=8 \\
        --tasks hellaswag --device cpu
    python -m lmforge.eval.lm_eval_adapter ...   # the same without the startup hook (or: lmforge-lm-eval ...)

From Python: `import lmforge.eval.lm_eval_adapter` registers the model, then
`lm_eval.simple_evaluate(model="lmforge", model_args="pretrained=DIR", tasks=[...])`, or pass an instance:
`simple_evaluate(model=LMForgeLM(model=m, tokenizer=tok), ...)`.

Plain `lm_eval --model lmforge ...` works once the startup hook is installed (scripts/setup.sh does it; see
lmforge/_lm_eval_hook.py): lm_eval 0.4.x finds models only in its own registry and reads no entry points, so
the hook registers "lmforge" lazily right after `lm_eval.models` loads. The launcher above works without it.
pyproject.toml also declares the entry point `lm_eval.models: lmforge` for releases that scan that group.

model_args: `pretrained` (model directory, required unless `model`/`tokenizer` objects are given),
`adapter` (PEFT adapter directory; its tokenizer is used when it holds one), `dtype` (auto | float32 | bfloat16 | float16), `batch_size` (sequences
per forward; "auto" means 8), `device` (auto | cpu | cuda[:N]), `max_length` (context window; default the
model's max_position_embeddings), `max_gen_toks` (default 256), `rolling_stride` (see below),
`add_bos_token` (run the tokenizer's post-processor, e.g. a Llama BOS, on contexts; default false as in
lm-eval's HF model), `seed` (for sampled generation).

The three request types reuse lmforge's own code, so lm-eval and `lmforge eval` give the same numbers:
- loglikelihood → `lmforge.eval.loglik.loglikelihood` (joint tokenisation of context + continuation,
  batched, identical inputs shared).
- loglikelihood_rolling → the perplexity module's strided windows (`sliding_windows`) over
  [prefix token] + the document's tokens, scored in batches across documents by `score_token_requests`;
  each token is scored exactly once. With the default `rolling_stride = max_length` these are lm-eval's
  windows (each predicts max_length new tokens with one token of overlap), except that lm-eval gives the
  LAST window extra left context; a smaller stride gives every window at least max_length - stride tokens
  of context.
- generate_until → the LLMEngine (the only generation code): `until` are stop strings (the text ends
  before them), `max_gen_toks` the token limit; greedy unless do_sample=true (as in HF generate). Other
  gen_kwargs: temperature, top_p, top_k, min_p, repetition_penalty, seed; unknown keys are an error.
  Contexts are left-truncated to leave room for max_gen_toks, as lm-eval's HF model does.
"""
from __future__ import annotations

import sys
from typing import Any, Sequence

import lm_eval.models  # noqa: F401  (registers lm_eval's own models: get_model() only does that on an empty registry)
from lm_eval.api.model import LM
from lm_eval.api.registry import register_model

from ..core.errors import ConfigError
from .loglik import loglikelihood, prefix_token_id, score_token_requests
from .perplexity import sliding_windows

DEFAULT_BATCH_SIZE = 8
_GEN_KEYS = {"until", "max_gen_toks", "max_new_tokens", "do_sample", "temperature", "top_p", "top_k", "min_p",
             "repetition_penalty", "seed"}


def _as_int(name: str, value: Any, default: int | None) -> int | None:
    if value is None or value == "":
        return default
    try:
        return int(value)
    except (TypeError, ValueError):
        raise ConfigError(f"lmforge lm_eval model_args: {name}={value!r} is not an integer") from None


def _as_bool(name: str, value: Any) -> bool:
    if isinstance(value, bool):
        return value
    if str(value).lower() in ("true", "1", "yes"):
        return True
    if str(value).lower() in ("false", "0", "no", ""):
        return False
    raise ConfigError(f"lmforge lm_eval model_args: {name}={value!r} is not true/false")


class LMForgeLM(LM):
    """An lmforge model (+ optional PEFT adapter) as an lm_eval `LM` (see the module docstring)."""

    def __init__(self, pretrained: str | None = None, adapter: str | None = None, dtype: str = "auto",
                 batch_size: int | str | None = DEFAULT_BATCH_SIZE, max_batch_size: int | None = None,
                 device: str | None = None, max_length: int | None = None, max_gen_toks: int = 256,
                 rolling_stride: int | None = None, add_bos_token: bool = False, seed: int = 0,
                 model: Any = None, tokenizer: Any = None, **unknown: Any) -> None:
        super().__init__()
        if unknown:
            raise ConfigError(f"lmforge lm_eval model_args: unknown key(s) {sorted(unknown)}; accepted: pretrained, "
                              "adapter, dtype, batch_size, device, max_length, max_gen_toks, rolling_stride, "
                              "add_bos_token, seed")
        self.pretrained, self.adapter = pretrained, adapter
        self.model, self.tokenizer = model, tokenizer
        if self.model is None or self.tokenizer is None:
            self._load(pretrained, adapter, dtype, device)
        self.model.eval()
        self._device = next(self.model.parameters()).device
        if isinstance(batch_size, str) and batch_size.startswith("auto"):
            batch_size = DEFAULT_BATCH_SIZE  # no memory probing: a fixed size, set batch_size=N to change it
        self.batch_size = _as_int("batch_size", batch_size, DEFAULT_BATCH_SIZE)
        model_max = int(self.model.config.max_position_embeddings)
        self._max_length = _as_int("max_length", max_length, model_max)
        self.max_gen_toks = _as_int("max_gen_toks", max_gen_toks, 256)
        self.rolling_stride = _as_int("rolling_stride", rolling_stride, self._max_length)
        self.add_bos_token = _as_bool("add_bos_token", add_bos_token)
        self.seed = _as_int("seed", seed, 0)
        if self.batch_size < 1 or self.max_gen_toks < 1:
            raise ConfigError("lmforge lm_eval model_args: batch_size and max_gen_toks must be >= 1")
        if not 2 <= self._max_length <= model_max:
            raise ConfigError(f"lmforge lm_eval model_args: max_length={self._max_length} must be in 2..{model_max} "
                              "(the model's max_position_embeddings)")
        if not 1 <= self.rolling_stride <= self._max_length:
            raise ConfigError(f"lmforge lm_eval model_args: rolling_stride={self.rolling_stride} must be in "
                              f"1..max_length={self._max_length}")
        self._engine: Any = None

    def _load(self, pretrained: str | None, adapter: str | None, dtype: str, device: str | None) -> None:
        """The checkpoint, its adapter and tokenizer, loaded exactly as `lmforge eval` loads them."""
        from ..core.device import pick_device
        from .harness import load_model
        from .suite import ModelSpec

        if not pretrained:
            raise ConfigError("lmforge lm_eval model_args: pretrained=DIR (an lmforge / HF model directory) is required")
        spec = ModelSpec(path=str(pretrained), adapter=str(adapter or ""), dtype=str(dtype or "auto"))
        self.model, self.tokenizer = load_model(spec, pick_device(str(device or "auto")))

    @classmethod
    def create_from_arg_string(cls, arg_string: str, additional_config: dict | None = None) -> "LMForgeLM":
        """As lm_eval's, but keys in model_args win over the harness-wide ones (--device, --batch_size)."""
        from lm_eval.utils import simple_parse_args_string

        return cls.create_from_arg_obj(simple_parse_args_string(arg_string), additional_config)

    @classmethod
    def create_from_arg_obj(cls, arg_dict: dict, additional_config: dict | None = None) -> "LMForgeLM":
        extra = {k: v for k, v in (additional_config or {}).items() if v is not None and k not in arg_dict}
        return cls(**arg_dict, **extra)

    # ---- lm_eval's properties ---------------------------------------------------------------------------

    @property
    def max_length(self) -> int:
        return self._max_length

    @property
    def tokenizer_name(self) -> str:
        return str(self.pretrained or "lmforge").replace("/", "__")

    def chat_template(self, chat_template: bool | str = False) -> str | None:
        return getattr(self.tokenizer, "chat_template", None) or ""

    def apply_chat_template(self, chat_history: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
        """The conversation rendered by the model's own chat template (lm_eval's --apply_chat_template)."""
        return self.tokenizer.apply_chat_template(chat_history, add_generation_prompt=add_generation_prompt)

    def get_model_info(self) -> dict[str, Any]:
        return {"model_source": "lmforge", "pretrained": self.pretrained, "adapter": self.adapter,
                "model_num_parameters": sum(p.numel() for p in self.model.parameters()),
                "model_dtype": str(next(self.model.parameters()).dtype), "max_length": self._max_length}

    # ---- requests ---------------------------------------------------------------------------------------

    def loglikelihood(self, requests: Sequence[Any], disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        """(summed log-probability, is greedy) of each continuation given its context."""
        pairs = [(str(r.args[0]), str(r.args[1])) for r in requests]
        scores = loglikelihood(self.model, self.tokenizer, pairs, batch_size=self.batch_size,
                               max_length=self._max_length, add_special_tokens=self.add_bos_token)
        results = []
        for request, score in zip(requests, scores):
            result = (score.logprob, score.is_greedy)
            self.cache_hook.add_partial("loglikelihood", request.args, result)
            results.append(result)
        return results

    def rolling_requests(self, text: str) -> list[tuple[list[int], list[int]]]:
        """The (context ids, scored ids) windows of one document: [prefix] + tokens, every token once."""
        tokens = self.tokenizer.encode(text)
        if not tokens:
            return []
        stream = [prefix_token_id(self.tokenizer)] + tokens
        # a window of max_length + 1 tokens feeds the model max_length of them (the last is only a target)
        return [(stream[w.begin:w.first_target], stream[w.first_target:w.end])
                for w in sliding_windows(len(stream), self._max_length + 1, self.rolling_stride)]

    def loglikelihood_rolling(self, requests: Sequence[Any], disable_tqdm: bool = False) -> list[float]:
        """Summed log-probability of each whole document, conditioned on the BOS/EOS prefix token."""
        windows, owners = [], []
        for index, request in enumerate(requests):
            for window in self.rolling_requests(str(request.args[0])):
                windows.append(window)
                owners.append(index)
        pad_id = next((v for v in (getattr(self.tokenizer, "pad_id", None), getattr(self.tokenizer, "eos_id", None))
                       if isinstance(v, int)), 0)
        scores = score_token_requests(self.model, windows, batch_size=self.batch_size, pad_id=pad_id,
                                      max_length=self._max_length)
        totals = [0.0] * len(requests)
        for owner, score in zip(owners, scores):
            totals[owner] += score.logprob
        for request, total in zip(requests, totals):
            self.cache_hook.add_partial("loglikelihood_rolling", request.args, total)
        return totals

    def engine(self) -> Any:
        """The LLMEngine used for generate_until, built on first use."""
        if self._engine is None:
            from ..infer import LLMEngine

            self._engine = LLMEngine(self.model, self.tokenizer, max_num_seqs=self.batch_size,
                                     max_num_batched_tokens=max(512, self.batch_size),
                                     max_model_len=self._max_length, seed=self.seed)
        return self._engine

    def sampling_params(self, gen_kwargs: dict[str, Any]) -> tuple[Any, list[str]]:
        """SamplingParams and the stop strings for one request's gen_kwargs."""
        from ..infer import SamplingParams

        kwargs = dict(gen_kwargs or {})
        unknown = sorted(set(kwargs) - _GEN_KEYS)
        if unknown:
            raise ConfigError(f"lmforge lm_eval: unsupported gen_kwargs {unknown}; supported: {sorted(_GEN_KEYS)}")
        until = kwargs.get("until") or []
        until = [until] if isinstance(until, str) else [str(u) for u in until]
        until = [u for u in until if u]
        max_tokens = _as_int("max_gen_toks", kwargs.get("max_gen_toks", kwargs.get("max_new_tokens")), self.max_gen_toks)
        sample = _as_bool("do_sample", kwargs.get("do_sample", False))
        temperature = float(kwargs.get("temperature", 1.0)) if sample else 0.0
        params = SamplingParams(
            max_tokens=max_tokens, temperature=temperature, top_p=float(kwargs.get("top_p", 1.0)),
            top_k=int(kwargs.get("top_k", 0) or 0), min_p=float(kwargs.get("min_p", 0.0)),
            repetition_penalty=float(kwargs.get("repetition_penalty", 1.0)),
            seed=_as_int("seed", kwargs.get("seed"), self.seed), stop=until or None)
        return params, until

    def generate_until(self, requests: Sequence[Any], disable_tqdm: bool = False) -> list[str]:
        """Greedy (or sampled) continuations, cut before the first `until` string."""
        engine = self.engine()
        prompts, params, stops = [], [], []
        for request in requests:
            context, gen_kwargs = request.args[0], request.args[1]
            p, until = self.sampling_params(gen_kwargs)
            p.max_tokens = min(p.max_tokens, engine.max_model_len - 1)
            ids = self.tokenizer.encode(str(context), add_special_tokens=self.add_bos_token)
            ids = ids[-(engine.max_model_len - p.max_tokens):] or [prefix_token_id(self.tokenizer)]
            prompts.append(ids)
            params.append(p)
            stops.append(until)
        outputs = engine.generate(prompts, params) if prompts else []
        texts = []
        for request, output, until in zip(requests, outputs, stops):
            text = output.outputs[0].text
            for stop in until:  # the engine already stops there; this also cuts a stop met inside a flush
                text = text.split(stop)[0]
            self.cache_hook.add_partial("generate_until", request.args, text)
            texts.append(text)
        return texts


def main(argv: list[str] | None = None) -> int:
    """`lm_eval`'s own CLI with the "lmforge" model type registered (this module is imported)."""
    from lm_eval.__main__ import cli_evaluate

    sys.argv = ["lm-eval", *(sys.argv[1:] if argv is None else argv)]
    cli_evaluate()
    return 0


if __name__ == "__main__":
    # Run as `python -m`: this file is `__main__`, so import it under its real name, whose import registers
    # the class (the name the startup hook's lazy entry points at).
    from lmforge.eval.lm_eval_adapter import main as _main

    raise SystemExit(_main())
else:
    register_model("lmforge")(LMForgeLM)
