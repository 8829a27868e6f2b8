"""The lm-evaluation-harness adapter: a local multiple-choice YAML task through lm_eval.simple_evaluate gives
lmforge's own MC scores item for item; rolling log-likelihood equals lmforge's perplexity NLL; generate_until
equals the engine's output cut at the stop string; the `python -m` launcher runs lm_eval's CLI. No network."""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

os.environ.setdefault("HF_DATASETS_OFFLINE", "1")  # before lm_eval / datasets are imported
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import pytest
import torch

pytest.importorskip("lm_eval")

from lm_eval import simple_evaluate  # noqa: E402
from lm_eval.api.instance import Instance  # noqa: E402
from lm_eval.tasks import TaskManager  # noqa: E402

from lmforge.core.errors import ConfigError  # noqa: E402
from lmforge.data.synthetic import generate_corpus, make_world, mc_questions, split_facts  # noqa: E402
from lmforge.eval.lm_eval_adapter import LMForgeLM  # noqa: E402
from lmforge.eval.multiple_choice import score_multiple_choice  # noqa: E402
from lmforge.eval.perplexity import stream_nll  # noqa: E402
from lmforge.eval.tasks import MCQuestion, questions_from_records  # noqa: E402
from lmforge.infer import LLMEngine, SamplingParams  # noqa: E402
from lmforge.model import ModelConfig, Transformer  # noqa: E402
from lmforge.tokenizer import TokenizerConfig, train_tokenizer  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
TASK = "lmforge_tiny_mc"


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    """A tiny random lmforge model with weights drawn larger than the default init (sharper predictions)."""
    tok = train_tokenizer([d["text"] for d in generate_corpus(seed=0, num_docs=120)],
                          TokenizerConfig(vocab_size=500, min_frequency=2))
    torch.manual_seed(0)
    config = ModelConfig(vocab_size=tok.vocab_size, hidden_size=48, intermediate_size=96, num_layers=2, num_heads=4,
                         num_kv_heads=2, max_position_embeddings=160)
    model = Transformer(config)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1:
                p.normal_(0, 0.08)
    path = tmp_path_factory.mktemp("lm_eval_model")
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def lm(model_dir) -> LMForgeLM:
    return LMForgeLM(pretrained=str(model_dir), dtype="float32", device="cpu", batch_size=4)


@pytest.fixture(scope="module")
def mc_task(tmp_path_factory) -> tuple[Path, list[MCQuestion]]:
    """A local lm_eval YAML task (JSONL data) laid out exactly as lmforge's MMLU-style prompt without a subject."""
    world = make_world(seed=0)
    records = mc_questions(world, split_facts(world, seed=0).test[:16], "en")
    questions = [MCQuestion(q.question, q.choices, q.answer) for q in questions_from_records(records)]
    root = tmp_path_factory.mktemp("lm_eval_task")
    data = root / "mc.jsonl"
    data.write_text("".join(json.dumps({"question": q.question, "choices": list(q.choices), "answer": q.answer})
                            + "\n" for q in questions), encoding="utf-8")
    prompt = "{{question.strip()}}{% for c in choices %}\n{{'ABCDEFGH'[loop.index0]}}. {{c}}{% endfor %}\nAnswer:"
    for name, choice in ((TASK, "{{choices}}"), (TASK + "_letter", "{{['A','B','C','D','E','F','G','H'][:choices|length]}}")):
        (root / f"{name}.yaml").write_text(
            f"task: {name}\n"
            "dataset_path: json\n"
            f"dataset_kwargs:\n  data_files:\n    test: {json.dumps(str(data))}\n"
            "test_split: test\n"
            "output_type: multiple_choice\n"
            f"doc_to_text: {json.dumps(prompt)}\n"
            f"doc_to_choice: {json.dumps(choice)}\n"
            "doc_to_target: answer\n"
            "metric_list:\n  - metric: acc\n  - metric: acc_norm\n", encoding="utf-8")
    return root, questions


def _per_item_logliks(samples: list[dict]) -> list[list[float]]:
    return [[float(r[0]) for r in s["filtered_resps"]] for s in sorted(samples, key=lambda s: s["doc_id"])]


def _evaluate(model: str, model_dir: Path, root: Path) -> dict:
    manager = TaskManager(include_path=str(root), include_defaults=False)
    return simple_evaluate(model=model, model_args=f"pretrained={model_dir},dtype=float32", batch_size=4,
                           tasks=[TASK, TASK + "_letter"], task_manager=manager, device="cpu", log_samples=True)


@pytest.fixture(scope="module")
def lm_eval_results(model_dir, mc_task) -> dict:
    return _evaluate("lmforge", model_dir, mc_task[0])


def test_lm_eval_mc_task_matches_lmforge_scoring(lm, mc_task, lm_eval_results):
    _, questions = mc_task
    results = lm_eval_results
    ours_text = score_multiple_choice(lm.model, lm.tokenizer, questions, scoring="text", length_unit="chars")
    ours_letter = score_multiple_choice(lm.model, lm.tokenizer, questions, scoring="letter")
    for task, ours in ((TASK, ours_text), (TASK + "_letter", ours_letter)):
        metrics = results["results"][task]
        assert metrics["acc,none"] == pytest.approx(ours.metrics["acc"], abs=1e-12)
        assert metrics["acc_norm,none"] == pytest.approx(ours.metrics["acc_norm"], abs=1e-12)
        theirs = _per_item_logliks(results["samples"][task])
        assert len(theirs) == len(questions)
        for got, prediction in zip(theirs, ours.predictions):
            assert got == pytest.approx(prediction.logprobs, abs=1e-4)
    assert 0 < ours_text.metrics["acc"] < 1  # the model is not degenerate: predictions differ per item
    assert results["config"]["model"] == "lmforge"


def test_same_numbers_as_lm_evals_own_hf_model(model_dir, mc_task, lm_eval_results):
    """lm_eval's transformers backend on the same checkpoint: the reference our adapter must agree with."""
    pytest.importorskip("transformers")
    reference = _evaluate("hf", model_dir, mc_task[0])
    for task in (TASK, TASK + "_letter"):
        assert lm_eval_results["results"][task]["acc,none"] == reference["results"][task]["acc,none"]
        assert lm_eval_results["results"][task]["acc_norm,none"] == reference["results"][task]["acc_norm,none"]
        ours, theirs = (_per_item_logliks(r["samples"][task]) for r in (lm_eval_results, reference))
        for got, expected in zip(ours, theirs):
            assert got == pytest.approx(expected, abs=1e-4)


def test_generation_and_perplexity_tasks_with_the_chat_template(lm, model_dir, mc_task, tmp_path):
    """lm_eval's generate_until and loglikelihood_rolling task types, with --apply_chat_template."""
    _, questions = mc_task
    data = tmp_path / "qa.jsonl"
    data.write_text("".join(json.dumps({"q": q.question, "a": q.choices[q.answer]}) + "\n" for q in questions[:4]))
    common = f"dataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {json.dumps(str(data))}\ntest_split: test\n"
    (tmp_path / "gen.yaml").write_text(
        "task: tiny_gen\n" + common + "output_type: generate_until\ndoc_to_text: \"Q: {{q}}\\nA:\"\n"
        "doc_to_target: a\ngeneration_kwargs:\n  until: [\"\\n\"]\n  max_gen_toks: 6\n"
        "metric_list:\n  - metric: exact_match\n")
    (tmp_path / "ppl.yaml").write_text(
        "task: tiny_ppl\n" + common + "output_type: loglikelihood_rolling\ndoc_to_text: \"\"\n"
        "doc_to_target: \"{{q}} {{a}}\"\nmetric_list:\n  - metric: bits_per_byte\n")
    results = simple_evaluate(model="lmforge", model_args=f"pretrained={model_dir},dtype=float32",
                              tasks=["tiny_gen", "tiny_ppl"], device="cpu", log_samples=True, apply_chat_template=True,
                              task_manager=TaskManager(include_path=str(tmp_path), include_defaults=False))
    gen = sorted(results["samples"]["tiny_gen"], key=lambda s: s["doc_id"])
    context, gen_kwargs = gen[0]["arguments"][0]
    assert context.startswith("<|im_start|>user\nQ: ") and context.endswith("<|im_start|>assistant\n")
    assert gen_kwargs["until"] == ["\n"] and gen_kwargs["max_gen_toks"] == 6
    direct = lm.generate_until([Instance("generate_until", {}, s["arguments"][0], i) for i, s in enumerate(gen)])
    assert [s["resps"][0][0] for s in gen] == direct
    ppl = sorted(results["samples"]["tiny_ppl"], key=lambda s: s["doc_id"])
    texts = [s["arguments"][0][0] for s in ppl]
    rolling = lm.loglikelihood_rolling([Instance("loglikelihood_rolling", {}, (t,), i) for i, t in enumerate(texts)])
    bpb = -sum(rolling) / math.log(2) / sum(len(t.encode("utf-8")) for t in texts)
    assert results["results"]["tiny_ppl"]["bits_per_byte,none"] == pytest.approx(bpb, rel=1e-6)


def test_loglikelihood_requests(lm):
    requests = [Instance("loglikelihood", {}, ("The capital is", " Paris"), 0),
                Instance("loglikelihood", {}, ("", "Hello world"), 1)]
    got = lm.loglikelihood(requests)
    from lmforge.eval.loglik import loglikelihood

    expected = loglikelihood(lm.model, lm.tokenizer, [("The capital is", " Paris"), ("", "Hello world")])
    assert [g[0] for g in got] == pytest.approx([e.logprob for e in expected], abs=1e-5)
    assert all(isinstance(g[1], bool) and g[0] < 0 for g in got)


def test_rolling_loglikelihood_equals_lmforge_perplexity_nll(model_dir):
    lm = LMForgeLM(pretrained=str(model_dir), dtype="float32", device="cpu", batch_size=3, max_length=24)
    texts = [d["text"] for d in generate_corpus(seed=5, num_docs=3)] + ["short text", ""]
    got = lm.loglikelihood_rolling([Instance("loglikelihood_rolling", {}, (t,), i) for i, t in enumerate(texts)])
    eos = lm.tokenizer.eos_id
    for text, value in zip(texts, got):
        ids = lm.tokenizer.encode(text)
        if not ids:
            assert value == 0.0
            continue
        stream = np.asarray([eos] + ids, dtype=np.int64)
        # lmforge's perplexity: the same windows (24 inputs -> 25-token windows, stride 24), same prefix
        reference = stream_nll(lm.model, stream, max_length=25, stride=24)
        assert reference.tokens == len(ids)
        assert value == pytest.approx(-reference.nll, rel=1e-5, abs=1e-4)
    assert len(lm.tokenizer.encode(texts[0])) > 3 * 24  # several windows were needed
    # a document that fits one window is exactly the model's log-likelihood of all its tokens after EOS
    ids = lm.tokenizer.encode("short text")
    with torch.no_grad():
        logits = lm.model(torch.tensor([[eos] + ids[:-1]]))[0].log_softmax(-1)
    assert got[3] == pytest.approx(float(logits[torch.arange(len(ids)), torch.tensor(ids)].sum()), abs=1e-4)
    # a smaller stride gives more context but still scores every token once
    strided = LMForgeLM(model=lm.model, tokenizer=lm.tokenizer, max_length=24, rolling_stride=8)
    value = strided.loglikelihood_rolling([Instance("loglikelihood_rolling", {}, (texts[0],), 0)])[0]
    stream = np.asarray([eos] + lm.tokenizer.encode(texts[0]), dtype=np.int64)
    assert value == pytest.approx(-stream_nll(lm.model, stream, max_length=25, stride=8).nll, rel=1e-5)


def test_generate_until_cuts_at_the_stop_string(lm):
    context = "Li Ming lives in"
    free = lm.generate_until([Instance("generate_until", {}, (context, {"until": [], "max_gen_toks": 12}), 0)])[0]
    engine = LLMEngine(lm.model, lm.tokenizer)
    direct = engine.generate([lm.tokenizer.encode(context)], SamplingParams(max_tokens=12, temperature=0))[0]
    assert free == direct.outputs[0].text and len(free) > 4
    stop = free[2:4]
    requests = [Instance("generate_until", {}, (context, {"until": [stop], "max_gen_toks": 12}), 0),
                Instance("generate_until", {}, (context, {"until": "\u2603", "max_gen_toks": 5, "do_sample": False}), 1)]
    cut, short = lm.generate_until(requests)
    assert cut == free.split(stop)[0] and stop not in cut
    assert short == engine.generate([lm.tokenizer.encode(context)],
                                    SamplingParams(max_tokens=5, temperature=0))[0].outputs[0].text
    with pytest.raises(ConfigError, match="num_beams"):
        lm.generate_until([Instance("generate_until", {}, (context, {"num_beams": 2}), 0)])


def test_adapter_model_arg_loads_a_peft_adapter(model_dir, tmp_path):
    from lmforge.peft import AdapterConfig, apply_adapter, save_adapter

    torch.manual_seed(1)
    tuned = apply_adapter(Transformer.from_pretrained(model_dir, dtype=torch.float32),
                          AdapterConfig(method="lora", r=4, alpha=8, target_modules="all-linear"))
    with torch.no_grad():
        for name, p in tuned.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.2)  # a trained-looking adapter (B starts at zero)
    save_adapter(tuned, tmp_path / "adapter")
    request = [Instance("loglikelihood", {}, ("Li Ming lives in", " Beijing"), 0)]
    base = LMForgeLM.create_from_arg_string(f"pretrained={model_dir},dtype=float32").loglikelihood(request)[0][0]
    adapted = LMForgeLM.create_from_arg_string(f"pretrained={model_dir},adapter={tmp_path / 'adapter'},dtype=float32")
    with_adapter = adapted.loglikelihood(request)[0][0]
    expected = LMForgeLM(model=tuned.eval(), tokenizer=adapted.tokenizer).loglikelihood(request)[0][0]
    assert with_adapter == pytest.approx(expected, abs=1e-5) and abs(with_adapter - base) > 1e-3
    assert adapted.get_model_info()["adapter"] == str(tmp_path / "adapter")


def test_model_args_are_checked(model_dir):
    with pytest.raises(ConfigError, match="unknown key"):
        LMForgeLM.create_from_arg_string(f"pretrained={model_dir},temprature=1")
    with pytest.raises(ConfigError, match="pretrained=DIR"):
        LMForgeLM()
    lm = LMForgeLM.create_from_arg_string(f"pretrained={model_dir},batch_size=2,device=cpu",
                                          {"batch_size": "auto", "device": "cuda:0", "max_batch_size": None})
    assert lm.batch_size == 2 and lm.device.type == "cpu"  # model_args win over the harness-wide flags
    from lm_eval.api.registry import get_model

    assert get_model("lmforge") is LMForgeLM and get_model("dummy").__name__ == "DummyLM"  # built-ins stay visible
    assert lm.apply_chat_template([{"role": "user", "content": "hi"}]).endswith("<|im_start|>assistant\n")


def _plain_lm_eval_command(tmp_path: Path) -> list[str]:
    """`lm_eval` itself. scripts/setup.sh puts the startup hook's .pth into site-packages; where it is missing
    (a plain `pip install`), the same .pth is read from a temporary site directory, as the interpreter would."""
    from lmforge import _lm_eval_hook

    lm_eval_bin = Path(sys.executable).with_name("lm_eval")
    if (_lm_eval_hook.site_packages() / _lm_eval_hook.PTH_NAME).exists() and lm_eval_bin.exists():
        return [str(lm_eval_bin)]
    site_dir = tmp_path / "site"
    site_dir.mkdir()
    _lm_eval_hook.write_pth(site_dir)
    code = (f"import site, sys; site.addsitedir({str(site_dir)!r}); sys.argv[0] = 'lm_eval'; "
            "from lm_eval.__main__ import cli_evaluate; cli_evaluate()")
    return [sys.executable, "-c", code]


@pytest.mark.slow
@pytest.mark.parametrize("how", ["lm_eval", "python -m launcher"])
def test_lm_eval_cli_with_model_lmforge(how, model_dir, mc_task, lm_eval_results, tmp_path):
    """`lm_eval --model lmforge --model_args pretrained=DIR` (plain lm-eval CLI, registered by the startup
    hook) and the `python -m` launcher give the in-process simple_evaluate accuracy."""
    root, questions = mc_task
    env = {**os.environ, "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    out = tmp_path / "results"
    command = (_plain_lm_eval_command(tmp_path) if how == "lm_eval"
               else [sys.executable, "-m", "lmforge.eval.lm_eval_adapter"])
    proc = subprocess.run(
        [*command, "--model", "lmforge",
         "--model_args", f"pretrained={model_dir},dtype=float32", "--tasks", TASK, "--include_path", str(root),
         "--device", "cpu", "--batch_size", "4", "--output_path", str(out)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    files = list(out.rglob("results_*.json"))
    assert files, proc.stdout[-2000:]
    acc = json.loads(files[0].read_text())["results"][TASK]["acc,none"]
    assert acc == pytest.approx(lm_eval_results["results"][TASK]["acc,none"], abs=1e-9)


def test_startup_hook_registers_lazily_and_only_once(tmp_path):
    """The hook imports nothing of lmforge's eval code until lm_eval asks for the model, and is idempotent."""
    from lmforge import _lm_eval_hook

    site_dir = tmp_path / "site"
    site_dir.mkdir()
    _lm_eval_hook.write_pth(site_dir)
    assert (site_dir / _lm_eval_hook.PTH_NAME).read_text() == _lm_eval_hook.PTH_LINE
    code = (f"import site, sys; site.addsitedir({str(site_dir)!r}); site.addsitedir({str(site_dir)!r}); "
            "from lmforge import _lm_eval_hook as h; "
            "assert sum(isinstance(f, h._AfterImport) for f in sys.meta_path) == 1; "
            "from lm_eval.api.registry import get_model, model_registry; "
            "assert 'lmforge.eval.lm_eval_adapter' not in sys.modules; "
            "cls = get_model('lmforge'); assert 'hf' in model_registry; "
            "print(cls.__module__, cls.__name__, 'torch' in sys.modules)")
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.split()[:2] == ["lmforge.eval.lm_eval_adapter", "LMForgeLM"]
