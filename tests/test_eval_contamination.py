"""Contamination: normalisation, hashed n-grams, overlap shares pinned by hand, short items, text files in any
JSONL layout, and packed shards decoded document by document (same answer as the text they were made from)."""
from __future__ import annotations

import json

import pytest

from lmforge.core.errors import ConfigError, DataError
from lmforge.eval.contamination import check_contamination, ngram_hashes, record_text, units


def test_units_normalise_case_punctuation_and_cjk():
    assert units("Li Ming lives in Harbor.") == ["li", "ming", "lives", "in", "harbor"]
    assert units("李明住在北京。") == list("李明住在北京")
    assert units("The cat, a dog!") == ["cat", "dog"]  # articles and punctuation go, as in EM/F1


def test_ngram_hashes_count_and_short_sequences():
    tokens = list("abcdefg")
    assert len(ngram_hashes(tokens, 3)) == 5
    assert ngram_hashes(tokens, 3) & ngram_hashes(list("xxcdeyy"), 3) == ngram_hashes(list("cde"), 3)
    assert len(ngram_hashes(["a", "b"], 5)) == 1 and ngram_hashes([], 3) == set()


def test_overlap_pinned_by_hand(tmp_path):
    words = [f"w{i}" for i in range(20)]
    train = tmp_path / "train.txt"
    train.write_text(" ".join(words[:10]) + "\nsomething else entirely here\n", encoding="utf-8")
    items = {
        "leaked": [" ".join(words[:10])],                 # 10 tokens, n=4: 7 grams, all in training
        "half": [" ".join(words[5:15])],                  # grams starting at w5, w6 (w5..w8, w6..w9) are in training
        "clean": [" ".join(f"z{i}" for i in range(10))],
        "short": ["Something else!", "nothing"],          # < short_n tokens: the whole item is one gram
    }
    report = check_contamination(items, [train], n=4, short_n=3)
    assert report["leaked"]["contaminated_share"] == 1.0 and report["leaked"]["mean_overlap"] == 1.0
    assert report["half"]["mean_overlap"] == pytest.approx(2 / 7) and report["half"]["contaminated_share"] == 1.0
    assert report["clean"]["contaminated_share"] == 0.0 and report["clean"]["mean_overlap"] == 0.0
    # "something else" (2 tokens < short_n) is one 2-gram, found inside "something else entirely here"
    assert report["short"]["contaminated_share"] == 0.5 and report["short"]["short_items"] == 2
    assert report["leaked"]["train_documents"] == 2


def test_short_items_use_short_n(tmp_path):
    train = tmp_path / "t.jsonl"
    train.write_text(json.dumps({"text": "alpha beta gamma delta epsilon"}) + "\n", encoding="utf-8")
    report = check_contamination({"q": ["beta gamma delta zeta", "omega psi chi phi"]}, [train], n=13, short_n=3)
    # item 1: 4 tokens < 13 -> 3-grams (beta gamma delta) found, (gamma delta zeta) not: overlap 1/2
    assert report["q"]["contaminated_share"] == 0.5 and report["q"]["mean_overlap"] == pytest.approx(0.25)


def test_any_jsonl_layout_is_read_as_text(tmp_path):
    sft = tmp_path / "sft.jsonl"
    sft.write_text(json.dumps({"messages": [{"role": "user", "content": "Where does Li Ming live now?"},
                                            {"role": "assistant", "content": "He lives in Harbor city."}]}) + "\n",
                   encoding="utf-8")
    assert "Harbor city" in record_text(json.loads(sft.read_text()))
    report = check_contamination({"gen": ["Where does Li Ming live now? Harbor"]}, [sft], n=13, short_n=5)
    assert report["gen"]["contaminated_share"] == 1.0


def test_errors_name_the_problem(tmp_path):
    with pytest.raises(ConfigError, match="short_n"):
        check_contamination({"a": ["x"]}, [tmp_path], n=3, short_n=5)
    with pytest.raises(ConfigError, match="contamination.train is empty"):
        check_contamination({"a": ["x"]}, [])
    with pytest.raises(DataError, match="not found"):
        check_contamination({"a": ["x"]}, [tmp_path / "missing.txt"])


def test_shards_agree_with_their_text(tmp_path):
    """Packed shards decoded one document at a time give the same overlap as the text they were packed from."""
    from eval_support import tiny_tokenizer

    from lmforge.data.pack import pack_documents
    from lmforge.data.readers import Document
    from lmforge.data.synthetic import generate_corpus

    tok = tiny_tokenizer()
    docs = [d["text"] for d in generate_corpus(seed=5, num_docs=30)]
    jsonl = tmp_path / "docs.jsonl"
    jsonl.write_text("".join(json.dumps({"text": t}, ensure_ascii=False) + "\n" for t in docs), encoding="utf-8")
    pack_documents([Document(t, "docs", str(jsonl), i) for i, t in enumerate(docs)], tok, tmp_path / "shards",
                   val_fraction=0.0, shard_size_tokens=500)  # several shards: documents cross shard boundaries
    items = {"leaked": [docs[3][:300], docs[17]], "mixed": [docs[0][:120] + " zzz yyy xxx www vvv uuu ttt sss rrr qqq",
                                                     "completely new words " * 5]}
    from_text = check_contamination(items, [jsonl], n=13, short_n=8)
    from_shards = check_contamination(items, [tmp_path / "shards"], tok, n=13, short_n=8)
    assert from_text == from_shards
    assert from_text["leaked"]["contaminated_share"] == 1.0 and from_text["leaked"]["mean_overlap"] == 1.0
    assert from_text["mixed"]["contaminated_share"] == 0.5 and 0 < from_text["mixed"]["mean_overlap"] < 0.5
    assert from_text["leaked"]["train_documents"] == 30
    with pytest.raises(ConfigError, match="tokenizer"):
        check_contamination(items, [tmp_path / "shards"], None)
