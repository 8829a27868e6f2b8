"""The eval harness and `lmforge eval`: a constructed model scores exactly as predicted, batch size never
changes a score, the same seed gives the same numbers, suites with a LoRA adapter, results.json layout, CLI."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from eval_support import save_model, tiny_model, tiny_tokenizer, write_small_tasks

from lmforge.cli import main
from lmforge.config import build_config
from lmforge.core.errors import ConfigError, DataError
from lmforge.eval import ModelSpec, TaskSpec, evaluate
from lmforge.eval.harness import load_model
from lmforge.eval.suite import Config, model_specs, task_specs

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tasks_dir(tmp_path_factory) -> Path:
    return write_small_tasks(tmp_path_factory.mktemp("tasks"))


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    return save_model(tmp_path_factory.mktemp("model") / "m", seed=0)


def _metrics(results: dict) -> dict:
    """Every number but the timings and memory (those legitimately vary between runs)."""
    return {m: {t: {k: v for k, v in e.items() if k != "efficiency"} for t, e in entry["tasks"].items()}
            for m, entry in results["models"].items()}


def _certain_of(token_id: int):
    """A real Transformer that predicts `token_id` with probability ~1 at every position: all embeddings equal
    one vector e, the blocks add nothing (o_proj/down_proj zero), and only lm_head's row `token_id` points at e."""
    model = tiny_model(seed=0)
    with torch.no_grad():
        e = torch.randn(model.config.hidden_size)
        model.model.embed_tokens.weight.copy_(e.expand_as(model.model.embed_tokens.weight))
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
        model.lm_head.weight.zero_()
        model.lm_head.weight[token_id] = 5.0 * e / e.norm()
    return model


def _mc_file(path: Path, answers: str) -> Path:
    rows = [{"question": f"Which letter is number {i}?", "A": "alpha", "B": "beta", "C": "gamma", "D": "delta",
             "answer": a, "subject": "letters" if i % 2 else "greek"} for i, a in enumerate(answers)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def test_constructed_model_gives_exactly_the_expected_accuracy(tmp_path):
    tok = tiny_tokenizer()
    target = tok.encode(" B")
    assert len(target) == 1 and len({tok.encode(f" {c}")[0] for c in "ABCD"}) == 4
    save_model(tmp_path / "sure_b", _certain_of(target[0]))
    data = _mc_file(tmp_path / "mc.jsonl", "BABCDBBDCA")  # 4 of 10 are B
    results = evaluate([ModelSpec(name="sure_b", path=str(tmp_path / "sure_b"))],
                       [TaskSpec(name="mc", type="mc", path=[str(data)], perturbations=["shuffle"], extract=True,
                                 max_new_tokens=2)], log=lambda _: None)
    task = results["models"]["sure_b"]["tasks"]["mc"]
    assert task["metrics"]["acc"] == 0.4 and task["metrics"]["acc_norm"] == 0.4
    # answering by generation: the engine writes " B B", the extracted letter is B
    assert task["metrics"]["acc_gen"] == 0.4 and task["metrics"]["no_answer_rate"] == 0.0
    assert task["samples"][0]["generation"] == " B B"
    # per subject: even rows (greek) B,B,D,B,C -> 3/5; odd rows (letters) A,C,B,D,A -> 1/5
    assert task["subjects"]["greek"]["acc"] == 0.6 and task["subjects"]["letters"]["acc"] == 0.2
    assert task["metrics"]["acc_macro"] == pytest.approx(0.4)
    # shuffling options moves the gold letter: a model that always says B is right where the gold lands on B
    from lmforge.eval.robustness import perturb_mc
    from lmforge.eval.tasks import read_mc_jsonl
    shuffled, _ = perturb_mc(read_mc_jsonl(data), "shuffle", seed=0)
    assert task["robustness"]["accuracy"]["shuffle"] == sum(q.answer == 1 for q in shuffled) / 10
    assert all(s["pred"] == "B" for s in task["samples"])


@pytest.fixture(scope="module")
def ppl_file(tmp_path_factory) -> Path:
    from lmforge.data.synthetic import generate_corpus

    path = tmp_path_factory.mktemp("ppl") / "val.jsonl"
    path.write_text("".join(json.dumps({"text": d["text"]}, ensure_ascii=False) + "\n"
                            for d in generate_corpus(seed=2, num_docs=4)), encoding="utf-8")
    return path


def _tasks(tasks_dir: Path, ppl_file: Path) -> list[TaskSpec]:
    return [TaskSpec(name="ppl", type="ppl", path=[str(ppl_file)], max_length=64, stride=32),
            TaskSpec(name="mc", type="mc", path=[str(tasks_dir / "mc_en_test.jsonl")],
                     dev_path=str(tasks_dir / "mc_en_train.jsonl"), shots=1, limit=8),
            TaskSpec(name="gen", type="gen", path=[str(tasks_dir / "qa_zh_test.jsonl")], limit=4, max_new_tokens=5,
                     metrics=["em", "f1", "rouge_l"])]


def test_batch_size_never_changes_a_score(model_dir, tasks_dir, ppl_file):
    models = [ModelSpec(name="m", path=str(model_dir))]
    one = evaluate(models, _tasks(tasks_dir, ppl_file), batch_size=1, log=lambda _: None)
    many = evaluate(models, _tasks(tasks_dir, ppl_file), batch_size=8, log=lambda _: None)
    a, b = _metrics(one)["m"], _metrics(many)["m"]
    assert a["mc"] == b["mc"] and a["gen"] == b["gen"]
    for key in ("tokens", "bytes", "windows"):
        assert a["ppl"]["metrics"][key] == b["ppl"]["metrics"][key]
    assert a["ppl"]["metrics"]["perplexity"] == pytest.approx(b["ppl"]["metrics"]["perplexity"], rel=1e-6)
    assert a["ppl"]["metrics"]["bits_per_byte"] == pytest.approx(b["ppl"]["metrics"]["bits_per_byte"], rel=1e-6)


def test_ppl_on_shards_equals_ppl_on_their_text(model_dir, ppl_file, tmp_path):
    from lmforge.data.pack import pack_documents
    from lmforge.data.readers import Document

    texts = [json.loads(line)["text"] for line in ppl_file.read_text(encoding="utf-8").splitlines()]
    pack_documents([Document(t, "docs", str(ppl_file), i) for i, t in enumerate(texts)], tiny_tokenizer(),
                   tmp_path / "shards", val_fraction=0.0, shard_size_tokens=300)
    tasks = [TaskSpec(name="text", type="ppl", path=[str(ppl_file)], max_length=64, stride=32),
             TaskSpec(name="shards", type="ppl", path=[str(tmp_path / "shards")], split="train", max_length=64,
                      stride=32)]
    got = evaluate([ModelSpec(name="m", path=str(model_dir))], tasks, log=lambda _: None)["models"]["m"]["tasks"]
    text, shards = got["text"]["metrics"], got["shards"]["metrics"]
    assert text["tokens"] == shards["tokens"] and text["bytes"] == shards["bytes"] == sum(len(t.encode()) for t in texts)
    assert text["bits_per_byte"] == pytest.approx(shards["bits_per_byte"], rel=1e-6)
    assert got["shards"]["efficiency"]["prompt_tokens"] == shards["tokens"]


def _code_file(path: Path) -> Path:
    rows = [{"task_id": "t0", "prompt": "def one():\n", "tests": ["assert one() == 1"]},
            {"task_id": "t1", "prompt": "def two():\n", "tests": ["assert two() == 2"]}]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def test_same_seed_same_numbers_with_sampling_and_perturbations(model_dir, tasks_dir, tmp_path):
    tasks = [TaskSpec(name="code", type="code", path=[str(_code_file(tmp_path / "code.jsonl"))], n=2, k=[1, 2],
                      temperature=1.0, max_new_tokens=6),
             TaskSpec(name="mc", type="mc", path=[str(tasks_dir / "mc_zh_test.jsonl")], limit=6,
                      perturbations=["typo", "shuffle", "paraphrase"])]
    runs = [evaluate([ModelSpec(name="m", path=str(model_dir))], tasks, seed=s, log=lambda _: None) for s in (3, 3)]
    assert _metrics(runs[0]) == _metrics(runs[1])
    robust = runs[0]["models"]["m"]["tasks"]["mc"]["robustness"]
    assert set(robust["accuracy"]) == {"original", "typo", "shuffle", "paraphrase"}
    assert set(runs[0]["models"]["m"]["tasks"]["code"]["metrics"]) >= {"pass@1", "pass@2"}


def _lora_adapter(base_dir: Path, out: Path) -> Path:
    from lmforge.model import Transformer
    from lmforge.peft import AdapterConfig, apply_adapter, save_adapter

    model = apply_adapter(Transformer.from_pretrained(base_dir), AdapterConfig(method="lora", r=4, alpha=8,
                                                                              target_modules="all-linear"))
    with torch.no_grad():
        torch.manual_seed(1)
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0.0, 0.5)  # peft starts B at zero; a trained adapter is not
    save_adapter(model, out, base_model_name_or_path=str(base_dir))
    return out


def test_adapter_is_applied_and_tokenizer_found(model_dir, tmp_path):
    adapter = _lora_adapter(model_dir, tmp_path / "adapter")
    base, tok = load_model(ModelSpec(path=str(model_dir)), torch.device("cpu"))
    lora, tok2 = load_model(ModelSpec(path=str(model_dir), adapter=str(adapter)), torch.device("cpu"))
    ids = torch.tensor([tok.encode("Li Ming lives in")])
    assert not torch.allclose(base(ids), lora(ids)) and tok.fingerprint() == tok2.fingerprint()


def _suite(tmp_path: Path, model_dir: Path, tasks_dir: Path, adapter: Path) -> Path:
    suite = {
        "models": [{"name": "base", "path": str(model_dir)},
                   {"name": "lora", "path": str(model_dir), "adapter": str(adapter), "chat": True}],
        "tasks": [{"name": "mc_en", "type": "mc", "path": [str(tasks_dir / "mc_en_test.jsonl")],
                   "dev_path": str(tasks_dir / "mc_en_train.jsonl"), "shots": 1, "limit": 6, "extract": True,
                   "max_new_tokens": 4},
                  "gen"],
        "gen": {"path": [str(tasks_dir / "qa_en_test.jsonl")], "limit": 4, "max_new_tokens": 4},
        "robustness": {"perturbations": ["typo"]},
        "contamination": {"train": [str(tasks_dir / "sft_train.jsonl")], "n": 8, "short_n": 4},
        "out_dir": str(tmp_path / "out"),
    }
    path = tmp_path / "suite.yaml"
    path.write_text(yaml.safe_dump(suite), encoding="utf-8")
    return path


def test_cli_suite_writes_results_predictions_and_reports(model_dir, tasks_dir, tmp_path, capsys):
    suite = _suite(tmp_path, model_dir, tasks_dir, _lora_adapter(model_dir, tmp_path / "adapter"))
    assert main(["eval", "--config", str(suite), "seed=1"]) == 0
    out = tmp_path / "out"
    results = json.loads((out / "results.json").read_text(encoding="utf-8"))
    assert list(results["models"]) == ["base", "lora"] and results["seed"] == 1
    assert results["config"]["seed"] == 1 and results["tasks"]["gen"]["metrics"] == ["em", "f1", "bleu", "rouge_l"]
    base, lora = results["models"]["base"]["tasks"], results["models"]["lora"]["tasks"]
    assert lora["mc_en"]["chat"] is True and base["mc_en"]["chat"] is False
    assert {"acc", "acc_norm", "acc_gen", "no_answer_rate"} <= set(base["mc_en"]["metrics"])
    assert base["mc_en"]["subjects"] and set(base["gen"]["robustness"]["accuracy"]) == {"original", "typo"}
    eff = base["gen"]["efficiency"]
    assert eff["generated_tokens"] > 0 and eff["generated_tokens_per_s"] > 0 and eff["peak_memory_mb"] > 0
    assert set(results["contamination"]) == {"mc_en", "gen"} and "total" in results["timings"]
    assert len((out / "predictions" / "lora" / "gen.jsonl").read_text().splitlines()) == 4
    html = (out / "report.html").read_text(encoding="utf-8")
    assert "data:image/png;base64," in html and "lora" in html and "Contamination" in html
    assert "| mc_en | acc |" in (out / "report.md").read_text(encoding="utf-8")
    # a second run must not overwrite the first
    assert main(["eval", "--config", str(suite)]) == 2
    assert "results.json exists" in capsys.readouterr().err


def test_single_model_command_line_form(model_dir, tasks_dir, tmp_path):
    assert main(["eval", "--model", str(model_dir), "--tasks", "mc", f"mc.path={tasks_dir / 'mc_zh_test.jsonl'}",
                 "mc.limit=4", f"out_dir={tmp_path / 'o'}", "report=false"]) == 0
    results = json.loads((tmp_path / "o" / "results.json").read_text(encoding="utf-8"))
    assert list(results["models"]) == ["m"] and results["models"]["m"]["tasks"]["mc"]["metrics"]["num_questions"] == 4
    assert not (tmp_path / "o" / "report.html").exists()


def test_config_errors_name_the_key(model_dir, tmp_path):
    def specs(*overrides):
        cfg = build_config(Config, {}, list(overrides))
        return model_specs(cfg), task_specs(cfg)

    with pytest.raises(ConfigError, match="no model"):
        specs("tasks=mc")
    with pytest.raises(ConfigError, match="no tasks"):
        specs(f"model={model_dir}")
    with pytest.raises(ConfigError, match="mc.path"):
        specs(f"model={model_dir}", "tasks=mc")
    with pytest.raises(ConfigError, match="is not one of"):
        specs(f"model={model_dir}", "tasks=mmlu")
    with pytest.raises(ConfigError, match="either model"):
        model_specs(build_config(Config, {"model": "a", "models": [{"path": "b"}]}))
    with pytest.raises(ConfigError, match="distinct name"):
        model_specs(build_config(Config, {"models": [{"path": "x/m"}, {"path": "y/m"}]}))
    with pytest.raises(ConfigError, match="essay.*is not one of"):
        task_specs(build_config(Config, {"tasks": [{"type": "essay", "path": ["a"]}]}))
    with pytest.raises(DataError, match="not found"):
        evaluate([ModelSpec(path=str(model_dir))], [TaskSpec(type="gen", path=[str(tmp_path / "none.jsonl")])])
    assert main(["eval", f"model={model_dir}", "tasks=ppl", f"ppl.path={tmp_path / 'missing'}"]) == 2


def test_recipe_suites_load():
    for name in ("quickstart", "mmlu_ceval"):
        tree = yaml.safe_load((ROOT / f"lmforge/recipes/suites/{name}.yaml").read_text(encoding="utf-8"))
        cfg = build_config(Config, tree, ["model=some/model"] if name == "mmlu_ceval" else [])
        tasks = task_specs(cfg)
        assert model_specs(cfg) and tasks
    qs = build_config(Config, yaml.safe_load((ROOT / "lmforge/recipes/suites/quickstart.yaml").read_text()))
    assert [m.label for m in model_specs(qs)] == ["base", "full-sft", "lora-sft"]
    assert {t.type for t in task_specs(qs)} == {"ppl", "mc", "gen"}


def test_efficiency_rates_and_per_task_memory_peak():
    import numpy as np

    from lmforge.eval.efficiency import Efficiency, Meter

    e = Efficiency(seconds=2.0, prompt_tokens=100, generated_tokens=50, requests=4, ttft=[0.1, 0.3], tpot=[0.02])
    d = e.to_dict()
    assert d["prompt_tokens_per_s"] == 50.0 and d["generated_tokens_per_s"] == 25.0
    assert d["latency_s_per_request"] == 0.5 and d["ttft_mean_s"] == pytest.approx(0.2) and d["tpot_mean_s"] == 0.02
    with Meter("cpu") as big:
        block = np.ones(200 * 2**20 // 8)  # 200 MiB touched
        del block
    with Meter("cpu") as small:
        pass
    assert big.result.seconds > 0 and big.result.peak_memory_mb > 0
    if big.result.memory_kind == "cpu_rss_peak":  # the per-task reset works here: the second task's peak is lower
        assert big.result.peak_memory_mb - small.result.peak_memory_mb > 150


def test_mc_token_count_is_the_distinct_rows_scored(model_dir, tasks_dir):
    from lmforge.eval.loglik import encode_pair
    from lmforge.eval.multiple_choice import build_context
    from lmforge.eval.runners import _mc_token_count
    from lmforge.eval.tasks import read_mc_jsonl

    tok = tiny_tokenizer()
    qs = read_mc_jsonl(tasks_dir / "mc_en_test.jsonl")[:3]
    letter = _mc_token_count(tok, qs, {}, TaskSpec(type="mc", path=["x"]).resolved(), chat=False)
    assert letter == sum(len(encode_pair(tok, build_context(q, [], "en"), " A")[0]) for q in qs)  # one row each
    text = _mc_token_count(tok, qs, {}, TaskSpec(type="mc", path=["x"], scoring="text").resolved(), chat=False)
    assert text > letter
