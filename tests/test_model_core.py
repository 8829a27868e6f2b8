"""Transformer behaviour that needs no reference library: KV cache, packing, padding, checkpoint errors,
gradient checkpointing, config round trips (plus the MoE aux loss against transformers when present)."""
from __future__ import annotations

import json

import pytest
import torch

from lmforge.core.errors import CheckpointError, ConfigError
from lmforge.model import KVCache, ModelConfig, Transformer, llama_33m, preset

TOL = 1e-4
BASE = dict(vocab_size=97, hidden_size=64, intermediate_size=96, num_layers=2, num_heads=4, num_kv_heads=2,
            max_position_embeddings=128)
VARIANTS = {
    "llama": dict(model_type="llama"),
    "mistral-window": dict(model_type="mistral", sliding_window=5),
    "mixtral": dict(model_type="mixtral", num_experts=4, num_experts_per_tok=2),
    "alibi": dict(model_type="llama", position_embedding="alibi"),
    "qwen2-dynamic": dict(model_type="qwen2", attention_bias=True, max_position_embeddings=8,
                          rope_scaling={"rope_type": "dynamic", "factor": 2.0}),
}


def make_model(kind: str = "llama", seed: int = 0) -> Transformer:
    torch.manual_seed(seed)
    model = Transformer(ModelConfig(**{**BASE, **VARIANTS[kind]})).eval()
    with torch.no_grad():
        for param in model.parameters():
            param.normal_(0.0, 0.5)
    return model


def tokens(*shape: int, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, BASE["vocab_size"], shape, generator=torch.Generator().manual_seed(seed))


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).abs().max().item()


@pytest.mark.parametrize("kind", [k for k in VARIANTS if k != "qwen2-dynamic"])
def test_kv_cache_incremental_logits_match_full_forward(kind):
    model = make_model(kind)
    ids = tokens(2, 14)
    with torch.no_grad():
        full = model(ids)
        cache = KVCache.for_model(model, batch_size=2, max_len=14)
        chunks = [model(ids[:, :5], kv_cache=cache)]
        for t in range(5, 9):
            chunks.append(model(ids[:, t:t + 1], kv_cache=cache))
        chunks.append(model(ids[:, 9:14], kv_cache=cache))  # a multi-token chunk after a prefix
    assert cache.length == 14
    assert max_diff(torch.cat(chunks, dim=1), full) <= TOL


@pytest.mark.parametrize("kind", list(VARIANTS))
def test_packed_batch_matches_each_document_alone(kind):
    model = make_model(kind)
    lengths = [5, 7, 4]
    docs = [tokens(1, n, seed=10 + i) for i, n in enumerate(lengths)]
    packed = torch.cat(docs, dim=1)
    document_ids = torch.cat([torch.full((1, n), i) for i, n in enumerate(lengths)], dim=1)
    with torch.no_grad():
        logits = model(packed, document_ids=document_ids)
        start = 0
        for doc in docs:
            alone = model(doc)
            assert max_diff(logits[:, start:start + doc.shape[1]], alone) <= TOL
            start += doc.shape[1]


@pytest.mark.parametrize("kind", ["llama", "mistral-window", "mixtral", "alibi"])
def test_left_padded_batch_matches_unpadded_rows(kind):
    model = make_model(kind)
    rows = [tokens(1, 12, seed=3), tokens(1, 7, seed=4)]
    ids = torch.zeros(2, 12, dtype=torch.long)
    mask = torch.zeros(2, 12, dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, 12 - row.shape[1]:] = row[0]
        mask[i, 12 - row.shape[1]:] = 1
    with torch.no_grad():
        batched = model(ids, attention_mask=mask)
        for i, row in enumerate(rows):
            alone = model(row)
            assert max_diff(batched[i:i + 1, 12 - row.shape[1]:], alone) <= TOL


def test_gradient_checkpointing_gives_same_gradients():
    def grads(checkpointing: bool) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        model = make_model("mixtral").train()
        model.gradient_checkpointing = checkpointing
        logits = model(tokens(2, 10))
        loss = logits.float().logsumexp(-1).mean() + model.aux_loss
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}

    loss_plain, plain = grads(False)
    loss_ckpt, ckpt = grads(True)
    assert torch.equal(loss_plain, loss_ckpt)
    for name in plain:
        assert max_diff(plain[name], ckpt[name]) <= 1e-5, name


def test_dense_model_aux_loss_is_zero():
    model = make_model("llama")
    model(tokens(1, 4))
    assert model.aux_loss.item() == 0.0


@pytest.mark.parametrize("padded", [False, True])
def test_moe_aux_loss_matches_transformers(tmp_path, padded):
    transformers = pytest.importorskip("transformers")
    model = make_model("mixtral")
    model.save_pretrained(tmp_path)
    reference = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    ids = tokens(2, 9)
    mask = torch.ones_like(ids)
    if padded:
        mask[1, :4] = 0
    with torch.no_grad():
        model(ids, attention_mask=mask if padded else None)
        out = reference(ids, attention_mask=mask if padded else None, output_router_logits=True)
    expected = model.config.router_aux_loss_coef * out.aux_loss
    print(f"aux loss: ours {model.aux_loss.item():.6f} hf {expected.item():.6f}")
    assert abs(model.aux_loss.item() - expected.item()) <= 1e-6


def test_save_load_round_trip_sharded_and_tied(tmp_path):
    torch.manual_seed(0)
    model = Transformer(ModelConfig(**{**BASE, "tie_word_embeddings": True}))
    model.save_pretrained(tmp_path, max_shard_size=20_000)
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert "lm_head.weight" not in index["weight_map"]
    assert len(set(index["weight_map"].values())) > 1
    loaded = Transformer.from_pretrained(tmp_path)
    assert loaded.lm_head.weight is loaded.model.embed_tokens.weight
    ids = tokens(1, 6)
    with torch.no_grad():
        assert torch.equal(loaded(ids), model.eval()(ids))
    model.save_pretrained(tmp_path)  # one file now: the stale shards and index must go
    assert not (tmp_path / "model.safetensors.index.json").exists()
    assert sorted(p.name for p in tmp_path.glob("*.safetensors")) == ["model.safetensors"]
    assert Transformer.from_pretrained(tmp_path, dtype="bf16").lm_head.weight.dtype == torch.bfloat16


@pytest.fixture
def saved(tmp_path):
    make_model("llama").save_pretrained(tmp_path)
    return tmp_path


def _rewrite_weights(path, change):
    from safetensors.torch import load_file, save_file

    tensors = load_file(str(path / "model.safetensors"))
    change(tensors)
    save_file(tensors, str(path / "model.safetensors"))


def test_missing_directory_config_or_weights_raise_checkpoint_error(saved, tmp_path):
    with pytest.raises(CheckpointError, match="not a directory"):
        Transformer.from_pretrained(tmp_path / "nope")
    (saved / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="model.safetensors"):
        Transformer.from_pretrained(saved)
    (saved / "config.json").unlink()
    with pytest.raises(CheckpointError, match="config.json"):
        Transformer.from_pretrained(saved)


def test_corrupt_files_raise_checkpoint_error_naming_the_file(saved):
    weights = saved / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    with pytest.raises(CheckpointError, match="model.safetensors"):
        Transformer.from_pretrained(saved)
    (saved / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="config.json"):
        Transformer.from_pretrained(saved)
    (saved / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    with pytest.raises(CheckpointError, match="model_type='gpt2'"):
        Transformer.from_pretrained(saved)


def test_missing_unexpected_and_misshaped_keys_are_named(saved):
    key = "model.layers.1.mlp.up_proj.weight"
    _rewrite_weights(saved, lambda t: t.pop(key))
    with pytest.raises(CheckpointError, match=f"missing weight {key}"):
        Transformer.from_pretrained(saved)
    _rewrite_weights(saved, lambda t: t.update({key: torch.zeros(96, 64), "model.extra.weight": torch.zeros(2)}))
    with pytest.raises(CheckpointError, match="unexpected weight model.extra.weight"):
        Transformer.from_pretrained(saved)
    _rewrite_weights(saved, lambda t: (t.pop("model.extra.weight"), t.update({key: torch.zeros(95, 64)})))
    with pytest.raises(CheckpointError, match=rf"{key} has shape \(95, 64\), expected \(96, 64\)"):
        Transformer.from_pretrained(saved)


def test_missing_shard_named(tmp_path):
    make_model("llama").save_pretrained(tmp_path, max_shard_size="20KB")
    shard = sorted(tmp_path.glob("model-*.safetensors"))[-1]
    shard.unlink()
    with pytest.raises(CheckpointError, match=shard.name):
        Transformer.from_pretrained(tmp_path)


def test_config_hf_round_trip_and_both_rope_layouts():
    config = ModelConfig(**{**BASE, "model_type": "mistral", "sliding_window": 5, "rope_theta": 1e6,
                            "rope_scaling": {"type": "yarn", "factor": 4.0}})
    assert config.rope_scaling == {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 128}
    hf = config.to_hf()
    assert hf["rope_parameters"]["rope_theta"] == 1e6 and hf["rope_theta"] == 1e6
    assert hf["architectures"] == ["MistralForCausalLM"] and hf["dtype"] == "float32"
    assert ModelConfig.from_hf(hf) == config
    old = {k: v for k, v in hf.items() if k != "rope_parameters"}
    assert ModelConfig.from_hf(old) == config


def test_alibi_is_not_saved_as_a_type_transformers_would_misread(tmp_path):
    model = make_model("alibi")
    model.save_pretrained(tmp_path)
    hf = json.loads((tmp_path / "config.json").read_text())
    assert hf["model_type"] == "lmforge_alibi" and hf["rope_parameters"] is None
    loaded = Transformer.from_pretrained(tmp_path)
    assert loaded.config.position_embedding == "alibi"
    ids = tokens(2, 8)
    with torch.no_grad():
        assert torch.equal(loaded(ids), model(ids))
    transformers = pytest.importorskip("transformers")
    with pytest.raises(ValueError, match="lmforge_alibi"):
        transformers.AutoModelForCausalLM.from_pretrained(tmp_path)
    with pytest.raises(ConfigError, match="sliding_window"):
        ModelConfig(**{**BASE, "sliding_window": 4}).to_hf()  # llama has no window in HF


def test_num_params_and_flops():
    config = llama_33m()
    assert config.num_params() == Transformer(preset("llama-tiny").replace(**{
        k: getattr(config, k) for k in ("vocab_size", "hidden_size", "intermediate_size", "num_layers",
                                        "num_heads", "num_kv_heads")})).num_params()
    assert 30e6 < config.num_params() < 36e6
    n = config.num_params(include_embedding=False)
    assert config.flops_per_token(256) == 6 * n + 6 * 8 * 256 * 512
    moe = ModelConfig(**{**BASE, **VARIANTS["mixtral"]})
    assert moe.num_params(active_only=True) < moe.num_params() == Transformer(moe).num_params()


def test_mixtral_loads_transformers5_fused_expert_keys_too(tmp_path):
    from safetensors.torch import save_file

    model = make_model("mixtral")
    model.save_pretrained(tmp_path)
    fused = {k: v.contiguous() for k, v in model.state_dict().items()}  # our in-memory names = HF 5's
    save_file(fused, str(tmp_path / "model.safetensors"))
    loaded = Transformer.from_pretrained(tmp_path)
    ids = tokens(1, 6)
    with torch.no_grad():
        assert max_diff(loaded(ids), model(ids)) <= 1e-5  # weight alignment can change the last bit
