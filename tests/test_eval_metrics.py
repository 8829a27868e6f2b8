"""Generative metrics (EM, F1, BLEU, ROUGE-L, pass@k) against hand-computed values and their reference
libraries, and the code sandbox pass@k runs programs in."""
from __future__ import annotations

import importlib.util
import math
import socket
from fractions import Fraction
from math import comb

import pytest

from lmforge.eval.metrics import (answer_tokens, bleu, exact_match, mean_pass_at_k, normalize_answer, pass_at_k,
                                  rouge_l, token_f1)
from lmforge.eval.sandbox import SandboxLimits, network_namespace_available, run_python

# ---- exact match and F1: SQuAD's normalisation ------------------------------------------------------------


def test_normalisation_follows_squad():
    assert normalize_answer("The  Quick, brown FOX!") == "quick brown fox"
    assert normalize_answer("an apple a day") == "apple day"
    assert normalize_answer("rock'n'roll") == "rocknroll"  # punctuation is deleted, not turned into spaces


def test_exact_match_takes_the_best_reference():
    assert exact_match("the Eiffel Tower.", ["Big Ben", "Eiffel tower"]) == 1.0
    assert exact_match("Eiffel", "Eiffel Tower") == 0.0


def test_token_f1_matches_hand_computed_values():
    # pred {cat, sat, on, mat} vs gold {cat, on, mat}: P = 3/4, R = 1, F1 = 6/7
    assert token_f1("the cat sat on the mat", "a cat on a mat") == pytest.approx(6 / 7)
    # repeated tokens count with multiplicity: pred {x y y}, gold {y y y}: 2 common, P = R = 2/3
    assert token_f1("x y y", "y y y") == pytest.approx(2 / 3)
    assert token_f1("cat", ["dog", "the cat"]) == 1.0
    assert token_f1("dog", "cat") == 0.0
    # SQuAD v2: an empty answer scores 1 only against an empty answer
    assert token_f1("", "") == 1.0 and token_f1("the", "a") == 1.0 and token_f1("", "cat") == 0.0


def test_chinese_is_scored_per_character():
    assert answer_tokens("北京是首都。", "zh") == ["北", "京", "是", "首", "都"]
    # pred 北京是首都 vs gold 首都北京: 4 common characters, P = 4/5, R = 1, F1 = 8/9
    assert token_f1("北京是首都", "首都北京") == pytest.approx(8 / 9)
    assert token_f1("北京是首都", "首都北京", lang="en") == 0.0  # whole strings as single words
    assert exact_match("北京。", "北 京") == 1.0  # full-width punctuation and spacing do not count
    assert answer_tokens("GPT-4 模型", "zh") == ["gpt", "4", "模", "型"]


# ---- BLEU (sacrebleu) and ROUGE-L (rouge-score) ----------------------------------------------------------

needs_sacrebleu = pytest.mark.skipif(importlib.util.find_spec("sacrebleu") is None, reason="sacrebleu not installed")
needs_rouge = pytest.mark.skipif(importlib.util.find_spec("rouge_score") is None, reason="rouge-score not installed")


@needs_sacrebleu
def test_bleu_matches_hand_computed_values():
    # all n-gram precisions 1; brevity penalty exp(1 - 7/6)
    assert bleu(["the cat sat on the mat"], ["the cat sat on the mat today"]) == pytest.approx(100 * math.exp(1 - 7 / 6))
    # precisions 5/6, 3/5, 2/4, 1/3, same length: geometric mean (1/12)^(1/4)
    assert bleu(["the cat sat on a mat"], ["the cat sat on the mat"]) == pytest.approx(100 * (1 / 12) ** 0.25)
    assert bleu(["the cat sat on the mat"], [["a dog ran", "the cat sat on the mat"]]) == pytest.approx(100.0)


@needs_sacrebleu
def test_bleu_uses_character_tokens_for_chinese():
    # sacrebleu's zh tokenizer splits every Han character: 7 of 9 reference characters, all precisions 1
    import sacrebleu

    assert bleu(["我爱北京天安门"], ["我爱北京天安门广场"]) == pytest.approx(100 * math.exp(1 - 9 / 7))
    reference = sacrebleu.corpus_bleu(["我爱北京天安门"], [["我爱北京天安门广场"]], tokenize="zh").score
    assert bleu(["我爱北京天安门"], ["我爱北京天安门广场"]) == pytest.approx(reference)


@needs_rouge
def test_rouge_l_matches_hand_computed_values_and_rouge_score():
    # LCS 5 of 5 predicted and 6 reference tokens: F = 2 * 1 * 5/6 / (1 + 5/6) = 10/11
    from rouge_score import rouge_scorer

    assert rouge_l(["the cat on the mat"], ["the cat sat on the mat"]) == pytest.approx(10 / 11)
    scorer = rouge_scorer.RougeScorer(["rougeL"])
    preds, refs = ["a quick brown fox jumps", "hello world"], ["the quick fox jumped", "hello there world"]
    expected = sum(scorer.score(r, p)["rougeL"].fmeasure for p, r in zip(preds, refs)) / 2
    assert rouge_l(preds, refs) == pytest.approx(expected)
    assert rouge_l(["hello world"], [["goodbye", "hello world"]]) == pytest.approx(1.0)


@needs_rouge
def test_rouge_l_scores_chinese_by_character():
    from rouge_score import rouge_scorer

    assert rouge_scorer.RougeScorer(["rougeL"]).score("我爱北京", "我爱上海")["rougeL"].fmeasure == 0.0  # why we tokenize
    assert rouge_l(["我爱上海"], ["我爱北京"]) == pytest.approx(0.5)  # LCS 我爱: P = R = 2/4


# ---- pass@k ----------------------------------------------------------------------------------------------


def test_pass_at_k_equals_the_exact_binomial_formula():
    assert pass_at_k(5, 1, 1) == pytest.approx(0.2)
    assert pass_at_k(5, 2, 2) == pytest.approx(1 - 3 / 10)  # 1 - C(3,2)/C(5,2)
    assert pass_at_k(4, 3, 2) == 1.0 and pass_at_k(10, 0, 5) == 0.0
    for n, c, k in [(10, 3, 1), (10, 3, 5), (20, 7, 10), (200, 37, 100), (200, 1, 1), (1000, 3, 100)]:
        exact = 1 - Fraction(comb(n - c, k), comb(n, k))
        assert pass_at_k(n, c, k) == pytest.approx(float(exact), rel=1e-12, abs=1e-15)


def test_pass_at_k_rejects_impossible_counts():
    for n, c, k in [(5, 6, 1), (5, 2, 6), (5, 2, 0)]:
        with pytest.raises(ValueError):
            pass_at_k(n, c, k)
    assert mean_pass_at_k([(5, 1), (5, 5)], 1) == pytest.approx(0.6)


# ---- sandbox ---------------------------------------------------------------------------------------------

SOLUTION = "def add(a, b):\n    return a + b\n"
TESTS = "assert add(2, 3) == 5\nassert add(-1, 1) == 0\n"


def test_sandbox_passes_a_correct_solution_and_fails_a_wrong_one():
    assert run_python(SOLUTION, TESTS).status == "passed"
    wrong = run_python(SOLUTION.replace("a + b", "a - b"), TESTS)
    assert wrong.status == "failed" and "AssertionError" in wrong.reason
    crash = run_python("def add(a, b):\n    return a +", TESTS)
    assert crash.status == "failed" and "SyntaxError" in crash.stderr


def test_sandbox_times_out_an_infinite_loop():
    busy = run_python("while True:\n    pass\n", "", SandboxLimits(timeout_s=5, cpu_s=1))
    assert busy.status == "timeout" and "CPU" in busy.reason
    sleepy = run_python("import time\nwhile True:\n    time.sleep(0.05)\n", "", SandboxLimits(timeout_s=0.5, cpu_s=5))
    assert sleepy.status == "timeout" and "wall-clock" in sleepy.reason and sleepy.duration_s < 5


def test_sandbox_stops_a_memory_hog():
    hog = run_python("blob = bytearray(2 << 30)\n", "", SandboxLimits(memory_mb=256))
    assert hog.status == "failed" and "memory" in hog.reason


def test_sandbox_environment_has_no_proxies_and_a_temporary_cwd(monkeypatch, tmp_path):
    monkeypatch.setenv("HTTPS_PROXY", "http://proxy.invalid:3128")
    monkeypatch.chdir(tmp_path)
    probe = "import os\nprint(sorted(k for k in os.environ if 'proxy' in k.lower()))\nprint(os.getcwd())\n" \
            "open('left.txt', 'w').write('x')\n"
    result = run_python(probe, "")
    proxies, cwd = result.stdout.splitlines()
    assert result.passed and proxies == "[]" and cwd != str(tmp_path) and "lmforge-sandbox-" in cwd
    assert not (tmp_path / "left.txt").exists()


@pytest.fixture
def listener():
    server = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    server.bind(("127.0.0.1", 0))
    server.listen(1)
    server.settimeout(0.2)
    yield server
    server.close()


def _assert_never_connected(server: socket.socket) -> None:
    with pytest.raises(socket.timeout):
        server.accept()


def test_sandbox_refuses_sockets_in_python(listener):
    port = listener.getsockname()[1]
    code = f"import socket\nsocket.create_connection(('127.0.0.1', {port}), timeout=1)\n"
    result = run_python(code, "", SandboxLimits(network_namespace=False))
    assert result.status == "failed" and "network access is disabled" in result.reason
    raw = run_python(f"import socket\ns = socket.socket()\ns.connect(('127.0.0.1', {port}))\n", "",
                     SandboxLimits(network_namespace=False))
    assert raw.status == "failed" and "PermissionError" in raw.reason
    _assert_never_connected(listener)


@pytest.mark.skipif(not network_namespace_available(), reason="unprivileged network namespaces unavailable")
def test_sandbox_network_namespace_blocks_even_raw_sockets(listener):
    port = listener.getsockname()[1]
    code = f"import _socket\ns = _socket.socket()\ns.settimeout(1)\ns.connect(('127.0.0.1', {port}))\n"  # bypasses the guard
    result = run_python(code, "", SandboxLimits(network_namespace=True))
    assert result.status == "failed" and "OSError" in result.reason
    _assert_never_connected(listener)
