"""Multiple-choice scoring (prompts, acc / acc_norm, averages, batching) and the MMLU / C-Eval / CMMLU /
JSONL task readers."""
from __future__ import annotations

import json
import math

import pytest
import torch
from torch import nn

from lmforge.core.errors import DataError
from lmforge.data.readers import ReadStats
from lmforge.data.synthetic import generate_corpus, make_world, mc_questions, split_facts
from lmforge.eval.loglik import encode_pair
from lmforge.eval.multiple_choice import build_context, pick_exemplars, score_multiple_choice
from lmforge.eval.tasks import (MCQuestion, load_mc_task, questions_from_records, read_mc_csv, read_mc_file,
                                read_mc_jsonl, subject_of)
from lmforge.model import ModelConfig, Transformer
from lmforge.tokenizer import TokenizerConfig, train_tokenizer


@pytest.fixture(scope="module")
def tokenizer():
    texts = [doc["text"] for doc in generate_corpus(seed=0, num_docs=200)]  # English and Chinese
    return train_tokenizer(texts, TokenizerConfig(vocab_size=600, min_frequency=2))  # carries the chatml template


@pytest.fixture(scope="module")
def world_questions():
    world = make_world(seed=0)
    split = split_facts(world, seed=0)
    test = questions_from_records(mc_questions(world, split.test[:24], "en") + mc_questions(world, split.test[:8], "zh"))
    dev = questions_from_records(mc_questions(world, split.train[:80], "en"))
    by_subject: dict[str, list[MCQuestion]] = {}
    for q in dev:
        by_subject.setdefault(q.subject, []).append(q)
    return test, by_subject


class FavourToken(nn.Module):
    """Every position's logits favour one token id: the option that ends in it is the model's answer."""

    def __init__(self, vocab_size: int, token_id: int) -> None:
        super().__init__()
        self.vocab_size, self.token_id = vocab_size, token_id

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        logits = torch.zeros(*input_ids.shape, self.vocab_size)
        logits[..., self.token_id] = 5.0
        return logits


class Uniform(nn.Module):
    """Every token has probability 1/V: an option's log-likelihood is -(its token count) * ln V."""

    def __init__(self, vocab_size: int) -> None:
        super().__init__()
        self.vocab_size = vocab_size

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        return torch.zeros(*input_ids.shape, self.vocab_size)


# ---- prompts ---------------------------------------------------------------------------------------------

QUESTION = MCQuestion("What is 2 + 2?", ("3", "4", "5", "22"), 1, "elementary_mathematics")
SHOT = MCQuestion("What is 1 + 1?", ("2", "1", "0", "11"), 0, "elementary_mathematics")


def test_prompt_is_the_mmlu_layout():
    assert build_context(QUESTION, [SHOT], "en") == (
        "The following are multiple choice questions (with answers) about elementary mathematics.\n\n"
        "What is 1 + 1?\nA. 2\nB. 1\nC. 0\nD. 11\nAnswer: A\n\n"
        "What is 2 + 2?\nA. 3\nB. 4\nC. 5\nD. 22\nAnswer:")
    assert build_context(QUESTION, [SHOT], "en", scoring="text").count("Answer: 2\n\n") == 1
    zh = MCQuestion("1 + 1 等于几？", ("2", "3"), 0, "数学")
    assert build_context(zh, [], "zh") == "以下是关于数学的单项选择题，请直接给出正确答案的选项。\n\n1 + 1 等于几？\nA. 2\nB. 3\n答案："


def test_chat_prompt_uses_the_template_with_a_generation_prompt(tokenizer):
    context = build_context(QUESTION, [SHOT], "en", chat_tokenizer=tokenizer)
    assert context.startswith("<|im_start|>system\nThe following are multiple choice questions")
    assert "<|im_start|>assistant\nA<|im_end|>" in context  # the exemplar's answer, as an assistant turn
    assert context.endswith("Answer:<|im_end|>\n<|im_start|>assistant\n")


def test_exemplars_come_from_the_same_subject_and_never_the_question_itself():
    other = MCQuestion("Which is prime?", ("4", "7"), 1, "number_theory")
    dev = {"elementary_mathematics": [QUESTION, SHOT, SHOT], "number_theory": [other]}
    assert pick_exemplars(QUESTION, dev, 2) == [SHOT, SHOT]
    assert pick_exemplars(QUESTION, dev, 0) == [] and pick_exemplars(QUESTION, None, 5) == []


# ---- scoring ---------------------------------------------------------------------------------------------


def test_a_model_that_always_says_b_scores_the_share_of_b_answers(tokenizer, world_questions):
    questions, _ = world_questions
    english = [q for q in questions if q.question.isascii()]
    favourite = tokenizer.encode(" B")[-1]
    result = score_multiple_choice(FavourToken(tokenizer.vocab_size, favourite), tokenizer, english, lang="en")
    assert all(p.pred == 1 for p in result.predictions)
    expected = sum(q.answer == 1 for q in english) / len(english)
    assert result.metrics["acc"] == pytest.approx(expected)
    assert result.metrics["acc_norm"] == pytest.approx(expected)  # letters are one byte each
    subjects = {q.subject for q in english}
    per_subject = {s: sum(q.answer == 1 for q in english if q.subject == s) / sum(q.subject == s for q in english)
                   for s in subjects}
    assert result.metrics["acc_macro"] == pytest.approx(sum(per_subject.values()) / len(per_subject))
    for s, rate in per_subject.items():
        assert result.metrics["subjects"][s]["acc"] == pytest.approx(rate)
    assert result.metrics["num_questions"] == len(english)


def test_chat_scoring_answers_right_after_the_assistant_header(tokenizer):
    favourite = tokenizer.encode("C")[-1]
    result = score_multiple_choice(FavourToken(tokenizer.vocab_size, favourite), tokenizer, [QUESTION], chat=True)
    assert result.predictions[0].pred == 2


def test_acc_norm_divides_by_the_options_bytes(tokenizer):
    short, long = "q", "the capital of the country"
    question = MCQuestion("Pick one.", (short, long), 0, "test")
    vocab = tokenizer.vocab_size
    result = score_multiple_choice(Uniform(vocab), tokenizer, [question], scoring="text", lang="en")
    prediction = result.predictions[0]
    context = build_context(question, [], "en", scoring="text")
    counts = [len(encode_pair(tokenizer, context, " " + option)[1]) for option in (short, long)]
    assert prediction.logprobs == pytest.approx([-n * math.log(vocab) for n in counts], rel=1e-5)
    assert prediction.lengths == [1, len(long)]
    assert counts[0] < counts[1] and counts[0] / 1 > counts[1] / len(long)  # the case where the two disagree
    assert (prediction.pred, prediction.pred_norm) == (0, 1)
    assert (result.metrics["acc"], result.metrics["acc_norm"]) == (1.0, 0.0)


@pytest.fixture(scope="module")
def random_model(tokenizer):
    torch.manual_seed(0)
    config = ModelConfig(vocab_size=tokenizer.vocab_size, hidden_size=32, intermediate_size=64, num_layers=2,
                         num_heads=4, num_kv_heads=2, max_position_embeddings=512)
    model = Transformer(config).eval()
    with torch.no_grad():
        for param in model.parameters():
            if param.dim() > 1:
                param.normal_(0.0, 0.3)
    return model


@pytest.mark.parametrize("scoring", ["letter", "text"])
def test_tiny_model_scores_do_not_depend_on_batch_size(random_model, tokenizer, world_questions, scoring):
    questions, dev = world_questions
    questions = questions[::3]  # English and Chinese
    runs = [score_multiple_choice(random_model, tokenizer, questions, dev, num_shots=2, scoring=scoring,
                                  batch_size=size) for size in (1, 5)]
    for a, b in zip(runs[0].predictions, runs[1].predictions):
        assert max(abs(x - y) for x, y in zip(a.logprobs, b.logprobs)) <= 1e-5
        assert (a.pred, a.pred_norm) == (b.pred, b.pred_norm)
    assert runs[0].metrics == runs[1].metrics
    assert any(p.num_shots == 2 for p in runs[0].predictions)


# ---- task files ------------------------------------------------------------------------------------------


def write(path, text: str):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


def test_reads_the_mmlu_layout(tmp_path):
    path = write(tmp_path / "data" / "test" / "abstract_algebra_test.csv",
                 'Find the order of Z_4.,1,2,4,8,C\n"A question\nover two lines, with a comma",x,y,z,w,a\n')
    questions = read_mc_csv(path)
    assert subject_of(path) == "abstract_algebra"
    assert questions[0] == MCQuestion("Find the order of Z_4.", ("1", "2", "4", "8"), 2, "abstract_algebra",
                                      f"{path}:1")
    assert questions[1].question == "A question\nover two lines, with a comma" and questions[1].answer == 0


def test_reads_the_ceval_layout_and_refuses_its_answerless_test_split(tmp_path):
    val = write(tmp_path / "val" / "computer_network_val.csv",
                "id,question,A,B,C,D,answer,explanation\n0,TCP 属于哪一层？,物理层,传输层,网络层,应用层,B,因为……\n")
    [question] = read_mc_file(val)
    assert (question.subject, question.choices[1], question.answer_letter) == ("computer_network", "传输层", "B")
    test = write(tmp_path / "test" / "computer_network_test.csv", "id,question,A,B,C,D\n0,问题,甲,乙,丙,丁\n")
    with pytest.raises(DataError, match="val split"):
        read_mc_file(test)


def test_loads_a_cmmlu_task_with_dev_exemplars(tmp_path):
    header = "\ufeff,Question,A,B,C,D,Answer\n"  # CMMLU files start with a BOM and an unnamed index column
    write(tmp_path / "cmmlu" / "dev" / "agronomy.csv", header + "0,农业问题一,甲,乙,丙,丁,A\n1,农业问题二,甲,乙,丙,丁,D\n")
    write(tmp_path / "cmmlu" / "test" / "agronomy.csv", header + "0,农业问题三,甲,乙,丙,丁,C\n")
    write(tmp_path / "cmmlu" / "test" / "anatomy.csv", header + "0,解剖问题,甲,乙,丙,丁,b\n")
    task = load_mc_task(tmp_path / "cmmlu", split="test", dev_split="dev")
    assert [(q.subject, q.answer_letter) for q in task.questions] == [("agronomy", "C"), ("anatomy", "B")]
    assert [q.question for q in task.dev["agronomy"]] == ["农业问题一", "农业问题二"]
    assert task.subjects == ["agronomy", "anatomy"] and task.name == "cmmlu"


def test_reads_generic_jsonl(tmp_path):
    records = [{"question": "Q1?", "A": "a", "B": "b", "C": "c", "D": "d", "answer": "D", "subject": "geo"},
               {"question": "Q2?", "choices": ["x", "y", "z"], "answer": 1}]
    path = write(tmp_path / "mine_test.jsonl", "\n".join(json.dumps(r) for r in records) + "\n\n")
    first, second = read_mc_jsonl(path)
    assert (first.subject, first.answer, len(first.choices)) == ("geo", 3, 4)
    assert (second.subject, second.answer, second.choices) == ("mine", 1, ("x", "y", "z"))


def test_bad_rows_name_the_file_and_line(tmp_path):
    path = write(tmp_path / "x_test.csv", 'ok?,1,2,3,4,A\n"two\nlines",1,2,3,4,E\nshort,1,2\n')
    with pytest.raises(DataError, match=r"x_test\.csv:2: answer 'E' is not one of A/B/C/D"):
        read_mc_csv(path)
    stats = ReadStats()
    assert len(read_mc_csv(path, on_error="skip", stats=stats)) == 1
    assert stats.skipped == 2 and "x_test.csv:4: 3 columns, expected 6" in stats.skipped_examples[1]
    bad_json = write(tmp_path / "y.jsonl", '{"question": "q", "A": "a", "B": "b", "answer": "A"}\n{"question": \n')
    with pytest.raises(DataError, match=r"y\.jsonl:2: not valid JSON"):
        read_mc_jsonl(bad_json)
    no_answer = write(tmp_path / "z.jsonl", '{"question": "q", "A": "a", "B": "b"}\n')
    with pytest.raises(DataError, match=r"z\.jsonl:1: missing field 'answer'"):
        read_mc_jsonl(no_answer)
