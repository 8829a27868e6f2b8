"""Vocabulary expansion (扩充词表), embeddings-only training, and `lmforge export --merge-adapter`."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from lmforge.cli import main
from lmforge.model import ModelConfig, Transformer
from lmforge.model.resize import expand_vocabulary, new_tokens_from, resize_token_embeddings
from lmforge.tokenizer import Tokenizer

from conftest import pretrain_args


def tiny_model(vocab: int, tie: bool, seed: int = 0) -> Transformer:
    torch.manual_seed(seed)
    cfg = ModelConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4,
                      num_kv_heads=2, max_position_embeddings=64, tie_word_embeddings=tie)
    return Transformer(cfg).eval()


@pytest.fixture()
def tokenizer(tiny_data) -> Tokenizer:
    return Tokenizer.from_pretrained(tiny_data.parent / "tokenizer")


@pytest.mark.parametrize("tie", [False, True])
def test_expand_vocabulary_inits_rows_from_subtokens_and_keeps_the_rest(tokenizer, tie):
    model = tiny_model(tokenizer.vocab_size, tie)
    old_embed = model.model.embed_tokens.weight.detach().clone()
    old_head = model.lm_head.weight.detach().clone()
    ids = torch.tensor([tokenizer.encode("Li Ming lives in a city.")])
    before = model(ids)
    words = [" Qingxi Harbour", "青溪市"]
    pieces = [tokenizer.encode(w) for w in words]
    assert all(len(p) >= 2 for p in pieces)
    new_ids = expand_vocabulary(model, tokenizer, words)
    assert new_ids == [old_embed.shape[0], old_embed.shape[0] + 1]
    assert model.config.vocab_size == tokenizer.vocab_size == old_embed.shape[0] + 2
    for word, token_id in zip(words, new_ids):
        assert tokenizer.encode(word) == [token_id]  # now one token
    embed, head = model.model.embed_tokens.weight, model.lm_head.weight
    assert torch.equal(embed[:old_embed.shape[0]], old_embed)
    assert torch.equal(head[:old_head.shape[0]], old_head)
    for piece, token_id in zip(pieces, new_ids):
        torch.testing.assert_close(embed[token_id], old_embed[piece].mean(0))
        torch.testing.assert_close(head[token_id], old_head[piece].mean(0))
    assert (embed is head) == tie
    after = model(ids)  # old tokens: same logits over the old vocabulary
    torch.testing.assert_close(after[..., :old_head.shape[0]], before, rtol=0, atol=0)
    assert embed.requires_grad and model.lm_head.out_features == tokenizer.vocab_size


def test_resize_pads_to_multiple_with_table_mean():
    model = tiny_model(50, tie=False)
    mean = model.model.embed_tokens.weight.detach().mean(0)
    assert resize_token_embeddings(model, [[1, 2]], pad_to_multiple_of=16) == 64
    torch.testing.assert_close(model.model.embed_tokens.weight[63], mean)
    assert model(torch.tensor([[1, 2, 63]])).shape == (1, 3, 64)


def test_new_tokens_from_a_domain_tokenizer(tiny_data, tokenizer, tmp_path):
    from lmforge.tokenizer import TokenizerConfig, train_tokenizer

    domain = ["量子计算机 量子比特 纠缠态 超导量子计算机"] * 200 + ["quantum computer qubit entanglement"] * 200
    other = train_tokenizer(iter(domain), TokenizerConfig(vocab_size=400, min_frequency=2))
    tokens = new_tokens_from(other, tokenizer, limit=20)
    assert tokens and len(tokens) <= 20
    assert all(len(tokenizer.encode(t)) >= 2 for t in tokens)
    assert any("量子" in t for t in tokens)


def test_vocab_command_writes_a_model_transformers_loads(tiny_data, tmp_path):
    transformers = pytest.importorskip("transformers")
    base = tmp_path / "base"
    tok = Tokenizer.from_pretrained(tiny_data.parent / "tokenizer")
    model = tiny_model(tok.vocab_size, tie=False)
    model.save_pretrained(base)
    tok.save_pretrained(base)
    (tmp_path / "tokens.txt").write_text(" Qingxi Harbour\n青溪市\n\n", encoding="utf-8")
    assert main(["vocab", f"model={base}", f"out={tmp_path / 'grown'}", f"tokens_file={tmp_path / 'tokens.txt'}",
                 "tokens=[' zebra-crossing']"]) == 0
    grown = Transformer.from_pretrained(tmp_path / "grown").eval()
    grown_tok = Tokenizer.from_pretrained(tmp_path / "grown")
    assert grown.config.vocab_size == grown_tok.vocab_size == tok.vocab_size + 3
    meta = json.loads((tmp_path / "grown" / "lmforge.json").read_text())
    assert meta["added"] == 3 and meta["old_vocab_size"] == tok.vocab_size
    ids = torch.tensor([grown_tok.encode("Li Ming visited 青溪市 near Qingxi Harbour")])
    assert ids.max() >= tok.vocab_size
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "grown").eval()
    with torch.no_grad():
        torch.testing.assert_close(hf(ids).logits, grown(ids), rtol=0, atol=1e-4)
    import tokenizers

    assert tokenizers.Tokenizer.from_file(str(tmp_path / "grown" / "tokenizer.json")).encode("青溪市").ids == \
        grown_tok.encode("青溪市")
    assert main(["vocab", f"model={base}", f"out={tmp_path / 'grown'}", "tokens=[x]"]) == 2  # refuses to clobber


def test_embeddings_only_stage_trains_only_embeddings_and_head(tiny_data, tmp_path):
    assert main(["pretrain", *pretrain_args(tiny_data, tmp_path / "base", "train.max_steps=2")]) == 0
    base_dir = tmp_path / "base" / "model"
    assert main(["vocab", f"model={base_dir}", f"out={tmp_path / 'grown'}", "tokens=[' Qingxi Harbour']"]) == 0
    args = [a for a in pretrain_args(tiny_data, tmp_path / "stage1", "train.max_steps=3") if not a.startswith("model.")]
    assert main(["pretrain", *args, f"model.init_from={tmp_path / 'grown'}", "model.trainable=embeddings"]) == 0
    before = Transformer.from_pretrained(tmp_path / "grown").state_dict()
    after = Transformer.from_pretrained(tmp_path / "stage1" / "model").state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed == {"model.embed_tokens.weight", "lm_head.weight"}
    assert main(["pretrain", *args, f"train.out_dir={tmp_path / 'bad'}", f"model.init_from={tmp_path / 'grown'}",
                 "model.trainable=attention"]) == 2


def test_export_merge_adapter_equals_the_adapted_model(tiny_data, tmp_path):
    transformers = pytest.importorskip("transformers")
    from lmforge.peft import AdapterConfig, apply_adapter, save_adapter

    tok = Tokenizer.from_pretrained(tiny_data.parent / "tokenizer")
    base = tiny_model(tok.vocab_size, tie=True, seed=1)
    base.save_pretrained(tmp_path / "base")
    tok.save_pretrained(tmp_path / "base")
    adapted = Transformer.from_pretrained(tmp_path / "base").eval()
    apply_adapter(adapted, AdapterConfig(method="lora", r=4, alpha=8, target_modules="all-linear"))
    with torch.no_grad():
        for name, p in adapted.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.2)
    save_adapter(adapted, tmp_path / "adapter")
    ids = torch.tensor([tok.encode("Li Ming lives in")])
    expected = adapted(ids)
    assert main(["export", f"--model={tmp_path / 'base'}", "--adapter", str(tmp_path / "adapter"), "--merge-adapter",
                 "--out", str(tmp_path / "merged")]) == 0
    merged = Transformer.from_pretrained(tmp_path / "merged").eval()
    assert not any("lora" in k for k in merged.state_dict())
    torch.testing.assert_close(merged(ids), expected, rtol=0, atol=1e-5)
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    with torch.no_grad():
        torch.testing.assert_close(hf(ids).logits, expected, rtol=0, atol=1e-4)
    assert json.loads((tmp_path / "merged" / "lmforge.json").read_text())["merged"] is True
    # bad input: adapter without merge, missing out, clobbering
    assert main(["export", f"model={tmp_path / 'base'}", f"adapter=[{tmp_path / 'adapter'}]",
                 f"out={tmp_path / 'x'}"]) == 2
    assert main(["export", f"model={tmp_path / 'base'}"]) == 2
    assert main(["export", f"model={tmp_path / 'base'}", f"out={tmp_path / 'merged'}"]) == 2
    assert main(["export", f"model={tmp_path / 'base'}", f"out={tmp_path / 'bf16'}", "dtype=bfloat16"]) == 0
    assert Transformer.from_pretrained(tmp_path / "bf16").lm_head.weight.dtype == torch.bfloat16
