"""Arena: Elo by hand, Bradley–Terry against simulated strengths and a brute-force MLE, bootstrap intervals,
verdict parsing, position swap against a judge served over HTTP, human votes, and resumable arena runs."""
from __future__ import annotations

import json
import math
import re
import socket
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest

from lmforge.core.errors import DataError, LMForgeError
from lmforge.data.readers import ReadStats
from lmforge.eval.arena import (ArenaConfig, ArenaModel, EngineAnswerer, ArenaPrompt, read_prompts, run_arena,
                                schedule_battles)
from lmforge.eval.arena_judge import JudgeConfig, LLMJudge, combine_verdicts, parse_verdict, read_human_votes
from lmforge.eval.arena_ratings import (Battle, bootstrap_ratings, bradley_terry_strengths, bt_ratings,
                                        confidence_intervals, elo_ratings, leaderboard)


def simulate(ratings: dict[str, float], n: int, seed: int, tie_rate: float = 0.0) -> list[Battle]:
    """Battles between random pairs, won with the Elo-scale logistic probability (ties at random)."""
    rng = np.random.default_rng(seed)
    names = sorted(ratings)
    battles = []
    for _ in range(n):
        i, j = rng.choice(len(names), size=2, replace=False)
        a, b = names[i], names[j]
        if rng.random() < tie_rate:
            battles.append(Battle(a, b, "tie"))
            continue
        p_a = 1 / (1 + 10 ** ((ratings[b] - ratings[a]) / 400))
        battles.append(Battle(a, b, "model_a" if rng.random() < p_a else "model_b"))
    return battles


# ---- ratings ---------------------------------------------------------------------------------------------

def test_elo_by_hand():
    battles = [Battle("x", "y", "model_a"), Battle("y", "z", "tie"), Battle("z", "x", "model_a")]
    r = elo_ratings(battles, k=32)
    # 1) x beats y at equal ratings: expected 0.5, so +-16
    x, y, z = 1016.0, 984.0, 1000.0
    # 2) y (984) ties z (1000): y expected 1/(1+10^(16/400)) = 0.4769904, gains 32*(0.5-0.4769904) = 0.7363068
    e_y = 1 / (1 + 10 ** (16 / 400))
    assert e_y == pytest.approx(0.4769904, abs=1e-7)
    y, z = y + 32 * (0.5 - e_y), z - 32 * (0.5 - e_y)
    assert (y, z) == pytest.approx((984.7363068, 999.2636932), abs=1e-6)
    # 3) z (999.264) beats x (1016): z expected 1/(1+10^((1016-999.264)/400)) = 0.4759331, gains 16.77
    e_z = 1 / (1 + 10 ** ((x - z) / 400))
    assert e_z == pytest.approx(0.4759331, abs=1e-7)
    z, x = z + 32 * (1 - e_z), x - 32 * (1 - e_z)
    assert r == pytest.approx({"x": x, "y": y, "z": z}, abs=1e-9)
    assert r["x"] == pytest.approx(999.2298602, abs=1e-6) and r["z"] == pytest.approx(1016.0338330, abs=1e-6)
    assert sum(r.values()) == pytest.approx(3000)  # Elo is zero-sum
    assert elo_ratings(battles, k=16)["x"] != r["x"]  # K matters


def test_bradley_terry_recovers_simulated_strengths():
    truth = {"a": 1000.0, "b": 1150.0, "c": 900.0, "d": 1050.0}
    fitted = bt_ratings(simulate(truth, 6000, seed=1, tie_rate=0.1), prior=0.0)
    offset = np.mean(list(truth.values())) - 1000.0  # BT ratings are centred on 1000
    for name, rating in truth.items():
        assert fitted[name] == pytest.approx(rating - offset, abs=30), (name, fitted)
    assert sorted(fitted, key=fitted.get) == ["c", "a", "d", "b"]


def test_bradley_terry_matches_a_brute_force_mle():
    optimize = pytest.importorskip("scipy.optimize")
    battles = ([Battle("a", "b", "model_a")] * 5 + [Battle("a", "b", "model_b")] * 2 + [Battle("b", "c", "model_a")] * 3
               + [Battle("c", "b", "model_a")] * 2 + [Battle("a", "c", "tie")] * 3 + [Battle("c", "a", "model_a")]
               + [Battle("a", "c", "model_a")] * 2 + [Battle("b", "c", "both_bad")])
    names = ["a", "b", "c"]

    def nll(beta: np.ndarray) -> float:  # ties as half a win each side; beta = natural-log strengths
        total = 0.0
        for bt in battles:
            i, j = names.index(bt.model_a), names.index(bt.model_b)
            p_a = 1 / (1 + math.exp(beta[j] - beta[i]))
            total -= bt.score_a * math.log(p_a) + (1 - bt.score_a) * math.log(1 - p_a)
        return total

    best = optimize.minimize(nll, np.zeros(3), method="BFGS", options={"gtol": 1e-10}).x
    expected = 400 / math.log(10) * (best - best.mean()) + 1000
    fitted = bt_ratings(battles, prior=0.0)
    assert [fitted[n] for n in names] == pytest.approx(expected.tolist(), abs=1e-3)


def test_bradley_terry_needs_a_prior_for_an_unbeaten_model():
    battles = [Battle("a", "b", "model_a")] * 3
    with pytest.raises(LMForgeError, match="never won"):
        bt_ratings(battles, prior=0.0)
    ratings = bt_ratings(battles, prior=0.01)
    assert ratings["a"] > ratings["b"] and all(math.isfinite(v) for v in ratings.values())
    wins = np.array([[0.0, 1.0, 0.0, 0.0], [1.0, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 1.0], [0.0, 0.0, 1.0, 0.0]])
    with pytest.raises(LMForgeError, match="disconnected"):
        bradley_terry_strengths(wins)


def test_bootstrap_interval_covers_truth_and_is_seeded():
    truth = {"a": 1000.0, "b": 1100.0, "c": 900.0}
    battles = simulate(truth, 1500, seed=4)
    samples = bootstrap_ratings(battles, "bt", rounds=100, seed=3, prior=0.0)
    ci = confidence_intervals(samples)
    for name, rating in truth.items():  # truth here is centred on 1000 already
        low, high = ci[name]
        assert low < rating < high, (name, ci[name])
        assert high - low < 120
    again = confidence_intervals(bootstrap_ratings(battles, "bt", rounds=100, seed=3, prior=0.0))
    assert again == ci
    other = confidence_intervals(bootstrap_ratings(battles, "bt", rounds=100, seed=4, prior=0.0))
    assert other != ci
    elo = confidence_intervals(bootstrap_ratings(battles, "elo", rounds=50, seed=1, k=4))
    assert elo == confidence_intervals(bootstrap_ratings(battles, "elo", rounds=50, seed=1, k=4))
    assert elo["b"][0] > elo["c"][1]  # a 200-point gap is resolved


def test_leaderboard_table_and_json():
    battles = [Battle("a", "b", "model_a")] * 6 + [Battle("b", "a", "tie")] * 2 + [Battle("c", "a", "model_b")] * 4 \
        + [{"model_a": "b", "model_b": "c", "winner": "model_a"}] * 3 + [Battle("c", "b", "both_bad")]
    board = leaderboard(battles, "bt", rounds=30, seed=0)
    assert [r.model for r in board.rows] == ["a", "b", "c"] and [r.rank for r in board.rows] == [1, 2, 3]
    a = board.rows[0]
    assert (a.battles, a.wins, a.losses, a.ties) == (12, 10, 0, 2)
    assert a.win_rate == pytest.approx(11 / 12)
    assert a.ci_lower <= a.rating <= a.ci_upper
    data = json.loads(json.dumps(board.to_dict()))
    assert data["method"] == "bt" and data["num_battles"] == 16 and data["models"][2]["model"] == "c"
    table = board.to_markdown().splitlines()
    assert table[0].startswith("| rank | model | rating (bt) | 95% CI | battles | win rate |")
    assert re.match(r"\| 1 \| a \| \d+\.\d \| \d+ – \d+ \| 12 \| 91\.7% \|", table[2])


# ---- verdicts and the judge ------------------------------------------------------------------------------

@pytest.mark.parametrize("reply, verdict", [
    ("A is clearer.\n[[A]]", "A"), ("[[ b ]]", "B"), ("Both fine. [[C]]", "C"), ("[[tie]]", "C"),
    ("【【A】】", "A"), ("Output [[A]], [[B]] or [[C]]. ... My verdict: [[B]]", "B"),
    ("Final verdict: Assistant B", "B"), ("Winner: A.", "A"), ("B", "B"), ("tie", "C"),
    ("Answer A is more detailed than answer B.", None), ("", None), (None, None), ("I cannot decide.", None),
])
def test_parse_verdict(reply, verdict):
    assert parse_verdict(reply) == verdict


def test_combine_verdicts_cancels_position_bias():
    assert combine_verdicts("A", "B") == "model_a"   # model_a wins in both positions
    assert combine_verdicts("B", "A") == "model_b"
    assert combine_verdicts("A", "A") == "tie"       # followed the position, not the answer
    assert combine_verdicts("C", "A") == "tie" and combine_verdicts("C", "C") == "tie"
    assert combine_verdicts(None, "A") is None


def _between(text: str, start: str, end: str) -> str:
    return text.split(start, 1)[1].split(end, 1)[0]


def _chat_reply(body: dict) -> str:
    """The fake endpoint's behaviour, by model name."""
    model, user = body["model"], body["messages"][-1]["content"]
    if model == "judge-fair":  # prefers the answer that says "correct"
        a = "correct" in _between(user, "[Answer A]", "[End of answer A]")
        b = "correct" in _between(user, "[Answer B]", "[End of answer B]")
        return "Compared.\n" + ("[[A]]" if a and not b else "[[B]]" if b and not a else "[[C]]")
    if model == "judge-first":
        return "The first one reads well. [[A]]"
    if model == "judge-mumble":
        return "Hard to say."
    number = int(re.search(r"\d+", user).group())
    if model == "strong":
        return f"correct answer to {number}"
    if model == "mid":
        return f"correct answer to {number}" if number % 2 == 0 else "not sure"
    return "no idea"


@contextmanager
def fake_openai_server():
    """A FastAPI app answering /v1/chat/completions, served by uvicorn on a free 127.0.0.1 port."""
    fastapi = pytest.importorskip("fastapi")
    uvicorn = pytest.importorskip("uvicorn")
    app = fastapi.FastAPI()
    seen: list[dict] = []

    @app.post("/v1/chat/completions")
    def chat(body: dict) -> dict:
        seen.append(body)
        if body["model"] == "judge-broken":
            raise fastapi.HTTPException(status_code=500, detail="judge crashed")
        return {"id": f"chatcmpl-{len(seen)}", "object": "chat.completion", "created": 0, "model": body["model"],
                "choices": [{"index": 0, "finish_reason": "stop",
                             "message": {"role": "assistant", "content": _chat_reply(body)}}],
                "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2}}

    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(app, log_level="error"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.time() + 20
    while not server.started and time.time() < deadline:
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}/v1", seen
    finally:
        server.should_exit = True
        thread.join(timeout=10)
        sock.close()


@pytest.fixture(scope="module")
def endpoint():
    pytest.importorskip("openai")
    with fake_openai_server() as served:
        yield served


def test_judge_over_http_and_position_swap(endpoint):
    url, seen = endpoint
    fair = LLMJudge(JudgeConfig(base_url=url, model="judge-fair", api_key="k"))
    verdict = fair.judge("q 1", "no idea", "the correct answer")
    assert (verdict.winner, verdict.verdicts) == ("model_b", ["B", "A"])
    assert seen[-1]["messages"][0]["content"].startswith("You are an impartial judge")
    assert "[Answer A]\nthe correct answer\n" in seen[-1]["messages"][1]["content"]  # the swapped call
    assert fair.judge("q", "correct", "correct too").winner == "tie"
    biased = LLMJudge(JudgeConfig(base_url=url, model="judge-first", api_key="k"))
    assert biased.judge("q", "no idea", "the correct answer").winner == "tie"
    unswapped = LLMJudge(JudgeConfig(base_url=url, model="judge-first", api_key="k", swap=False))
    assert unswapped.judge("q", "no idea", "the correct answer").winner == "model_a"
    mumble = LLMJudge(JudgeConfig(base_url=url, model="judge-mumble", api_key="k"))
    assert mumble.judge("q", "a", "b").winner is None


# ---- human votes and prompts -----------------------------------------------------------------------------

def test_human_votes_report_bad_lines(tmp_path):
    path = tmp_path / "votes.jsonl"
    lines = [{"model_a": "x", "model_b": "y", "winner": "model_a", "user": "u1"},
             {"model_a": "x", "model_b": "y", "winner": "both_bad"},
             {"model_a": "x", "model_b": "y", "winner": "A"},
             {"model_a": "x", "model_b": "x", "winner": "tie"}]
    path.write_text("\n".join(json.dumps(l) for l in lines) + "\n{not json\n", encoding="utf-8")
    with pytest.raises(DataError, match=r"votes.jsonl:3: winner='A' is not one of model_a\|model_b\|tie\|both_bad"):
        read_human_votes(path)
    stats = ReadStats()
    votes = read_human_votes(path, on_error="skip", stats=stats)
    assert votes == [Battle("x", "y", "model_a"), Battle("x", "y", "both_bad")]
    assert stats.skipped == 3 and any(":5:" in e for e in stats.skipped_examples)


def test_prompt_set_and_schedule(tmp_path):
    path = tmp_path / "prompts.jsonl"
    path.write_text(json.dumps({"id": "p1", "prompt": "hi"}) + "\n"
                    + json.dumps({"messages": [{"role": "system", "content": "s"}, {"role": "user", "content": "u"}]})
                    + "\n" + json.dumps({"id": "p1", "prompt": "again"}) + "\n", encoding="utf-8")
    with pytest.raises(DataError, match="prompts.jsonl:3: id 'p1' appears twice"):
        read_prompts(path)
    prompts = read_prompts(path, on_error="skip")
    assert [p.id for p in prompts] == ["p1", "line-2"] and prompts[1].question == "u"
    everything = schedule_battles(["p1", "p2"], ["a", "b", "c"], "all", seed=0)
    assert len(everything) == 6 and len({p.battle_id for p in everything}) == 6
    assert {frozenset((p.model_a, p.model_b)) for p in everything} == {frozenset("ab"), frozenset("ac"), frozenset("bc")}
    assert {p.model_a for p in everything} != {"a", "b"}  # A/B placement is drawn, not alphabetical
    sampled = schedule_battles(["p1", "p2"], ["a", "b", "c"], "random", num_battles=4, seed=5)
    assert len(sampled) == 4 and sampled == schedule_battles(["p1", "p2"], ["a", "b", "c"], "random", 4, seed=5)


# ---- whole runs ------------------------------------------------------------------------------------------

def _arena_config(url: str, tmp_path: Path, judge: str = "judge-fair") -> ArenaConfig:
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"id": f"q{i}", "prompt": f"question {i}?"}) + "\n" for i in range(6)),
                       encoding="utf-8")
    models = [ArenaModel(name=n, kind="openai", base_url=url, api_key="k") for n in ("weak", "strong", "mid")]
    return ArenaConfig(prompts=str(prompts), models=models, out_dir=str(tmp_path / "arena"), seed=1,
                       judge=JudgeConfig(base_url=url, model=judge, api_key="k"), bootstrap_rounds=50,
                       flush_every=4, concurrency=2)


def test_arena_run_is_resumable(endpoint, tmp_path):
    url, seen = endpoint
    cfg = _arena_config(url, tmp_path)
    result = run_arena(cfg, log=lambda _m: None)
    out = tmp_path / "arena"
    assert [r.model for r in result.leaderboards["bt"].rows] == ["strong", "mid", "weak"]
    assert [r.model for r in result.leaderboards["elo"].rows][0] == "strong"
    answers = [json.loads(l) for l in (out / "answers.jsonl").read_text().splitlines()]
    assert len(answers) == 18 and {a["model"] for a in answers} == {"weak", "strong", "mid"}
    battles = [json.loads(l) for l in (out / "battles.jsonl").read_text().splitlines()]
    assert len(battles) == 18 and all(len(b["verdicts"]) == 2 for b in battles)
    strong_weak = [b for b in battles if {b["model_a"], b["model_b"]} == {"strong", "weak"}]
    assert all(b["winner"] == ("model_a" if b["model_a"] == "strong" else "model_b") for b in strong_weak)
    board = json.loads((out / "leaderboard.json").read_text())
    assert board["judged_battles"] == 18 and board["bt"]["models"][0]["model"] == "strong"
    assert "## Bradley–Terry" in (out / "leaderboard.md").read_text()

    calls = len(seen)
    again = run_arena(cfg, log=lambda _m: None)  # everything on disk: no request at all
    assert len(seen) == calls and again.leaderboards["bt"].to_dict() == result.leaderboards["bt"].to_dict()
    (out / "battles.jsonl").write_text("".join(json.dumps(b) + "\n" for b in battles[:10]))  # as if killed
    run_arena(cfg, log=lambda _m: None)
    assert len(seen) == calls + 8 * 2  # only the 8 missing battles, each judged twice
    assert len((out / "battles.jsonl").read_text().splitlines()) == 18

    calls = len(seen)
    cfg.max_tokens = 64  # new generation settings: every answer again, but the same texts need no new verdicts
    run_arena(cfg, log=lambda _m: None)
    assert len(seen) == calls + 18
    cfg.judge.model = "judge-first"  # another judge: every battle again, no answer
    changed = run_arena(cfg, log=lambda _m: None)
    assert len(seen) == calls + 18 + 18 * 2 and {b["winner"] for b in changed.battles} == {"tie"}


def test_arena_with_a_position_biased_judge_gives_ties(endpoint, tmp_path):
    url, _ = endpoint
    result = run_arena(_arena_config(url, tmp_path, judge="judge-first"), log=lambda _m: None)
    assert {b["winner"] for b in result.battles} == {"tie"}
    ratings = [r.rating for r in result.leaderboards["bt"].rows]
    assert max(ratings) - min(ratings) == pytest.approx(0, abs=1e-6)


def test_endpoint_failure_names_the_endpoint_and_keeps_the_answers(endpoint, tmp_path):
    url, _ = endpoint
    cfg = _arena_config(url, tmp_path, judge="judge-broken")
    cfg.judge.max_retries = 0
    with pytest.raises(LMForgeError, match=rf"judge endpoint {re.escape(url)}: InternalServerError"):
        run_arena(cfg, log=lambda _m: None)
    assert len((tmp_path / "arena" / "answers.jsonl").read_text().splitlines()) == 18


def test_arena_with_human_votes_only(tmp_path):
    votes = tmp_path / "votes.jsonl"
    votes.write_text("".join(json.dumps({"model_a": a, "model_b": b, "winner": w}) + "\n" for a, b, w in
                             [("x", "y", "model_a")] * 5 + [("y", "x", "model_b"), ("x", "y", "tie"), ("y", "z", "model_a")]))
    cfg = ArenaConfig(human_votes=str(votes), out_dir=str(tmp_path / "out"), bootstrap_rounds=20, methods=["bt"])
    result = run_arena(cfg, log=lambda _m: None)
    assert result.human_votes == 8 and [r.model for r in result.leaderboards["bt"].rows] == ["x", "y", "z"]
    with pytest.raises(LMForgeError, match="nothing to rate"):
        run_arena(ArenaConfig(out_dir=str(tmp_path / "o2")), log=lambda _m: None)


@pytest.fixture(scope="module")
def tiny_chat_models(tmp_path_factory):
    """Two tiny random lmforge model directories sharing a chatml tokenizer."""
    import torch

    from lmforge.data.synthetic import generate_corpus
    from lmforge.model import ModelConfig, Transformer
    from lmforge.tokenizer import TokenizerConfig, train_tokenizer

    tok = train_tokenizer([d["text"] for d in generate_corpus(seed=0, num_docs=60)],
                          TokenizerConfig(vocab_size=400, min_frequency=2))
    dirs = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        config = ModelConfig(vocab_size=tok.vocab_size, hidden_size=32, intermediate_size=64, num_layers=2,
                             num_heads=4, num_kv_heads=2, max_position_embeddings=128)
        path = tmp_path_factory.mktemp(f"chat_model_{seed}")
        Transformer(config).save_pretrained(path)
        tok.save_pretrained(path)
        dirs.append(path)
    return dirs


def test_lmforge_models_answer_through_the_engine_with_the_chat_template(endpoint, tiny_chat_models, tmp_path):
    import torch

    from lmforge.infer import LLMEngine, SamplingParams
    from lmforge.model import Transformer
    from lmforge.tokenizer import Tokenizer

    url, _ = endpoint
    cfg = _arena_config(url, tmp_path)
    cfg.models = [ArenaModel(name=f"tiny{i}", path=str(d), device="cpu", dtype="float32")
                  for i, d in enumerate(tiny_chat_models)]
    cfg.max_tokens = 8
    result = run_arena(cfg, log=lambda _m: None)
    assert len(result.battles) == 6 and {r.model for r in result.leaderboards["bt"].rows} == {"tiny0", "tiny1"}
    answers = {(a["model"], a["prompt_id"]): a for a in
               map(json.loads, (tmp_path / "arena" / "answers.jsonl").read_text().splitlines())}
    # the same answer straight from the engine on the chat-templated prompt, greedy
    tok = Tokenizer.from_pretrained(tiny_chat_models[0])
    prompt = ArenaPrompt("q3", (("user", "question 3?"),))
    ids = tok.apply_chat_template(prompt.as_messages(), add_generation_prompt=True, tokenize=True)
    answerer = EngineAnswerer(cfg.models[0], 8, 0.0, cfg.seed)
    assert answerer.prompt_ids(prompt) == ids and "<|im_start|>assistant" in tok.decode(ids)
    engine = LLMEngine(Transformer.from_pretrained(tiny_chat_models[0], dtype=torch.float32), tok)
    stop = [tok.token_to_id("<|im_end|>")]
    direct = engine.generate([ids], SamplingParams(max_tokens=8, temperature=0, stop_token_ids=stop))[0]
    assert answers[("tiny0", "q3")]["output"] == direct.outputs[0].text

    import os

    weights = tiny_chat_models[0] / "model.safetensors"
    os.utime(weights, ns=(weights.stat().st_atime_ns, weights.stat().st_mtime_ns + 10**9))  # "retrained in place"
    run_arena(cfg, log=lambda _m: None)
    again = {(a["model"], a["prompt_id"]): a for a in
             map(json.loads, (tmp_path / "arena" / "answers.jsonl").read_text().splitlines())}
    assert all(again[k]["fingerprint"] != answers[k]["fingerprint"] for k in again if k[0] == "tiny0")
    assert all(again[k] == answers[k] for k in again if k[0] == "tiny1")


def test_cli_runs_an_arena_from_yaml(endpoint, tmp_path, capsys):
    import yaml

    from lmforge.cli import main

    url, _ = endpoint
    cfg = _arena_config(url, tmp_path)
    config = {"prompts": cfg.prompts, "out_dir": cfg.out_dir, "bootstrap_rounds": 20, "methods": ["bt"],
              "models": [{"name": n, "kind": "openai", "base_url": url, "api_key": "k"} for n in ("weak", "strong")],
              "judge": {"base_url": url, "model": "judge-fair", "api_key": "k"}}
    path = tmp_path / "arena.yaml"
    path.write_text(yaml.safe_dump(config), encoding="utf-8")
    assert main(["arena", "--config", str(path), "pairs=random", "num_battles=4"]) == 0
    assert "4 judged battles" in capsys.readouterr().out
    board = json.loads((tmp_path / "arena" / "leaderboard.json").read_text())
    assert [m["model"] for m in board["bt"]["models"]] == ["strong", "weak"] and board["bt"]["num_battles"] == 4
    config["models"][1]["name"] = "weak"
    path.write_text(yaml.safe_dump(config), encoding="utf-8")
    assert main(["arena", "--config", str(path)]) == 2
    assert "names must be unique" in capsys.readouterr().err
