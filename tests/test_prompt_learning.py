"""Prompt learning (prefix, P-tuning v2, prompt tuning, P-tuning): training touches only the virtual tokens,
the saved adapter reproduces the trained model exactly, peft reads ours and we read peft's with equal logits,
generation with a KV cache equals full forwards, and `lmforge finetune` trains each method end to end."""
from __future__ import annotations

import importlib
import json
import warnings
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from conftest import crash_during, finetune_args, step_losses

from lmforge.core.errors import ConfigError
from lmforge.model import PRESETS, KVCache, Transformer
from lmforge.peft import (PromptLearningConfig, add_prompt_adapter, delete_prompt_adapter, disable_prompt_adapters,
                          load_adapter, save_adapter, virtual_tokens)
from lmforge.peft.prompt_learning import preload_cache

METHODS = ["prefix", "ptuning_v2", "prompt", "ptuning"]
P = 3
IDS = torch.tensor([[5, 17, 33, 2, 90, 41, 7, 8], [9, 1, 60, 3, 3, 77, 12, 4]])


def tiny_config(**kw):
    return replace(PRESETS["llama-tiny"](), vocab_size=97, hidden_size=64, intermediate_size=96, num_layers=2,
                   num_heads=4, num_kv_heads=2, max_position_embeddings=64, **kw)


def fresh_base(seed: int = 0) -> Transformer:
    torch.manual_seed(seed)
    return Transformer(tiny_config()).eval()


def adapted(method: str, seed: int = 0, **kw) -> Transformer:
    model = fresh_base(seed)
    torch.manual_seed(seed + 1)
    cfg = PromptLearningConfig(method=method, num_virtual_tokens=P, encoder_hidden_size=16, **kw)
    return add_prompt_adapter(model, cfg)


# ----- training touches only the virtual tokens ------------------------------------------------------------
@pytest.mark.parametrize("method,encoder", [("prefix", "mlp"), ("ptuning_v2", "mlp"), ("prompt", "mlp"),
                                            ("ptuning", "mlp"), ("ptuning", "lstm")])
def test_a_step_moves_the_virtual_tokens_and_not_the_base(method, encoder):
    model = adapted(method, encoder_type=encoder).train()
    base_before = {n: p.detach().clone() for n, p in model.named_parameters() if not n.startswith("prompt_encoder.")}
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(n.startswith("prompt_encoder.default.") for n in trainable)
    if method in ("prefix", "ptuning"):  # reparameterised: an encoder beside the table
        assert any(".transform." in n or "_head." in n for n in trainable)
    before = {n: p.detach().clone() for n, p in trainable.items()}
    opt = torch.optim.AdamW(trainable.values(), lr=1e-2)
    logits = model(IDS)
    assert logits.shape == (2, IDS.shape[1], 97)  # the real tokens only: labels line up with input_ids
    loss = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, 97), IDS[:, 1:].reshape(-1))
    loss.backward()
    opt.step()
    assert all(not torch.equal(before[n], p) for n, p in trainable.items()), "a trainable tensor did not move"
    for name, param in model.named_parameters():
        if not name.startswith("prompt_encoder."):
            assert param.grad is None and torch.equal(param, base_before[name]), f"frozen {name} changed"


@pytest.mark.parametrize("method", METHODS)
def test_bf16_autocast_training_step_runs_and_keeps_fp32_master_weights(method):
    model = adapted(method).train()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = model(IDS)
    loss = torch.nn.functional.cross_entropy(logits.float()[:, :-1].reshape(-1, 97), IDS[:, 1:].reshape(-1))
    loss.backward()
    grads = [p.grad for p in model.prompt_encoder.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert all(p.dtype == torch.float32 for p in model.prompt_encoder.parameters())


def test_delete_gives_back_the_plain_base():
    model = adapted("prefix")
    base = fresh_base()
    with torch.no_grad():
        assert not torch.allclose(model(IDS), base(IDS))
        with disable_prompt_adapters(model):
            assert torch.equal(model(IDS), base(IDS))
        delete_prompt_adapter(model, "default")
        assert torch.equal(model(IDS), base(IDS))
    assert all(p.requires_grad for p in model.parameters()) and model.num_virtual_tokens == 0
    assert not any(n.startswith("prompt_encoder") for n, _ in model.named_parameters())


def test_a_deep_copy_is_independent_and_inactive_loads_stay_inactive(tmp_path):
    import copy

    model = adapted("prompt")
    twin = copy.deepcopy(model)
    delete_prompt_adapter(twin, "default")
    with torch.no_grad():
        assert torch.equal(twin(IDS), fresh_base()(IDS))
        assert not torch.allclose(model(IDS), fresh_base()(IDS))  # the original keeps its adapter
    save_adapter(model, tmp_path)
    other = load_adapter(fresh_base(), tmp_path, "saved", activate=False)
    with torch.no_grad():
        assert torch.equal(other(IDS), fresh_base()(IDS)) and other.num_virtual_tokens == 0
        from lmforge.peft import set_prompt_adapter

        set_prompt_adapter(other, "saved")
        assert torch.equal(other(IDS), model(IDS))


# ----- what the virtual tokens compute -------------------------------------------------------------------
def test_prompt_tokens_sit_at_positions_0_to_p_and_equal_the_same_prefix_kv():
    """A prompt-tuning adapter and a P-tuning-v2 adapter holding the K/V that the prompt's embeddings produce
    in each layer give the same logits: virtual slots come first, real tokens at positions P.. in both."""
    prompt = adapted("prompt")
    table = virtual_tokens(prompt)
    cache = KVCache.for_model(prompt, 1, P)
    with torch.no_grad(), disable_prompt_adapters(prompt):
        prompt.hidden_states(inputs_embeds=table[None], kv_cache=cache)
    kv = torch.stack([torch.stack([cache.keys[i][0], cache.values[i][0]]) for i in range(2)])  # [L, 2, kvh, P, d]
    flat = kv.permute(3, 0, 1, 2, 4).reshape(P, -1)  # peft's prefix layout: per token, layer-major, key first
    v2 = adapted("ptuning_v2")
    with torch.no_grad():
        v2.prompt_encoder["default"].embedding.weight.copy_(flat)
        manual = prompt.lm_head(prompt.hidden_states(
            inputs_embeds=torch.cat([table[None].expand(2, -1, -1), prompt.model.embed_tokens(IDS)], 1)))[:, P:]
        assert torch.allclose(prompt(IDS), manual, atol=1e-6)
        assert torch.allclose(v2(IDS), prompt(IDS), atol=1e-5)


@pytest.mark.parametrize("method", METHODS)
def test_kv_cache_decoding_and_padding_match_the_full_forward(method):
    model = adapted(method)
    with torch.no_grad():
        full = model(IDS)
        cache = KVCache.for_model(model, 2, P + IDS.shape[1])
        steps = [model(IDS[:, :5], kv_cache=cache)] + [model(IDS[:, t:t + 1], kv_cache=cache) for t in range(5, 8)]
        assert cache.virtual_tokens == P and cache.length == P + IDS.shape[1]
        assert torch.allclose(torch.cat(steps, 1), full, atol=1e-5)
        # right padding: an attention mask over the real tokens; the real positions keep their logits
        padded = torch.cat([IDS[:, :6], torch.zeros(2, 3, dtype=torch.long)], 1)
        mask = torch.cat([torch.ones(2, 6, dtype=torch.long), torch.zeros(2, 3, dtype=torch.long)], 1)
        assert torch.allclose(model(padded, attention_mask=mask)[:, :6], model(IDS[:, :6]), atol=1e-5)


@pytest.mark.parametrize("method", ["prefix", "prompt"])
def test_generate_with_an_adapter_equals_greedy_full_forwards(method):
    from lmforge.infer.generate import generate

    model = adapted(method)
    prompts = [[5, 17, 33, 2], [9, 1, 60]]
    out = generate(model, prompts, max_new_tokens=5)
    for prompt, got in zip(prompts, out):
        ids = list(prompt)
        with torch.no_grad():
            for _ in range(5):
                ids.append(int(model(torch.tensor([ids]))[0, -1].argmax()))
        assert got == ids[len(prompt):]  # the left-padded row in the batch generates what it generates alone
    with torch.no_grad(), disable_prompt_adapters(model):
        assert generate(model, prompts, max_new_tokens=5) != out  # the adapter changes the output


def test_preloaded_cache_is_marked_and_misuse_is_refused():
    model = adapted("prefix")
    cache = KVCache.for_model(model, 1, 16)
    assert preload_cache(model, cache, 1) == P and cache.length == P
    with pytest.raises(Exception, match="empty KV cache"):
        preload_cache(model, cache, 1)
    with pytest.raises(ConfigError, match="data.packing=false"):
        model(IDS, document_ids=torch.zeros_like(IDS))
    model.train()
    model.gradient_checkpointing = True
    with pytest.raises(ConfigError, match="activation_checkpointing"):
        model(IDS)


def test_text_init_starts_from_the_texts_token_embeddings():
    class Tok:
        def encode(self, text):
            return [11, 12]

    model = fresh_base()
    cfg = PromptLearningConfig(method="prompt", num_virtual_tokens=5, init="text", init_text="hello")
    add_prompt_adapter(model, cfg, tokenizer=Tok())
    expected = model.model.embed_tokens.weight[[11, 12, 11, 12, 11]]
    assert torch.equal(virtual_tokens(model), expected)
    with pytest.raises(ConfigError, match="method=prompt only"):
        PromptLearningConfig(method="prefix", init="text", init_text="x").validate()


# ----- save + load ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("method", METHODS)
def test_save_and_reload_reproduce_the_logits_exactly(method, tmp_path):
    from safetensors.torch import load_file

    model = adapted(method)
    save_adapter(model, tmp_path, base_model_name_or_path="base")
    saved = load_file(str(tmp_path / "adapter_model.safetensors"))
    width = 2 * 2 * 2 * 16 if method in ("prefix", "ptuning_v2") else 64  # layers·2·kv_heads·head_dim | hidden
    assert list(saved) == ["prompt_embeddings"] and tuple(saved["prompt_embeddings"].shape) == (P, width)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["peft_type"] == {"prefix": "PREFIX_TUNING", "ptuning_v2": "PREFIX_TUNING",
                                   "prompt": "PROMPT_TUNING", "ptuning": "P_TUNING"}[method]
    assert config["num_virtual_tokens"] == P and config["task_type"] == "CAUSAL_LM"
    assert (tmp_path / "prompt_encoder.safetensors").is_file() == (method in ("prefix", "ptuning"))
    reloaded = load_adapter(fresh_base(), tmp_path)
    assert not reloaded.prompt_encoder["default"].reparameterised  # the final tokens only, as peft loads them
    with torch.no_grad():
        assert torch.equal(reloaded(IDS), model(IDS))


def test_loading_refuses_an_adapter_for_another_shape(tmp_path):
    from lmforge.core.errors import CheckpointError

    save_adapter(adapted("prefix"), tmp_path)
    other = Transformer(replace(tiny_config(), num_kv_heads=4))
    with pytest.raises(CheckpointError, match="token_dim"):
        load_adapter(other, tmp_path)
    assert not hasattr(other, "prompt_learning_state")


# ----- interop with peft ------------------------------------------------------------------------------------
def _hf_base(tmp_path_factory):
    transformers = pytest.importorskip("transformers")
    config = transformers.LlamaConfig(vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    config.bos_token_id, config.eos_token_id = 1, 2
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for param in model.parameters():  # larger than the default init, so a layout error shows
            param.copy_(torch.randn(param.shape, generator=generator) * 0.5)
    path = tmp_path_factory.mktemp("hf_llama")
    model.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    pytest.importorskip("peft")
    return _hf_base(tmp_path_factory)


def _hf(path):
    import transformers

    return transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def _real_logits(method: str, logits: torch.Tensor) -> torch.Tensor:
    """peft returns logits for the virtual positions too when it prepends embeddings (prompt, P-tuning)."""
    return logits[:, P:] if method in ("prompt", "ptuning") else logits


@pytest.mark.parametrize("method,encoder", [("prefix", "mlp"), ("ptuning_v2", "mlp"), ("prompt", "mlp"),
                                            ("ptuning", "lstm")])
def test_our_adapter_loads_in_peft_with_equal_logits(method, encoder, hf_dir, tmp_path):
    import peft

    ours = Transformer.from_pretrained(hf_dir).eval()
    torch.manual_seed(5)
    add_prompt_adapter(ours, PromptLearningConfig(method=method, num_virtual_tokens=P, encoder_hidden_size=16,
                                                  encoder_type=encoder))
    save_adapter(ours, tmp_path, base_model_name_or_path=str(hf_dir))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = peft.PeftModel.from_pretrained(_hf(hf_dir), tmp_path).eval()
    mask = torch.ones_like(IDS)
    with torch.no_grad():
        expected = _real_logits(method, theirs(input_ids=IDS, attention_mask=mask).logits)
        got = ours(IDS, attention_mask=mask)
        base = _hf(hf_dir)(IDS).logits
    diff = (got - expected).abs().max().item()
    print(f"lmforge -> peft [{method}]: max abs diff {diff:.2e} (adapter moves logits by "
          f"{(expected - base).abs().max().item():.2f})")
    assert (expected - base).abs().max().item() > 0.1 and diff <= 1e-4


def _peft_configs():
    import peft

    return {
        "prompt": lambda: peft.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=P),
        "prefix": lambda: peft.PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=P, prefix_projection=True,
                                                  encoder_hidden_size=16),
        "ptuning_v2": lambda: peft.PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=P),
        "ptuning_mlp": lambda: peft.PromptEncoderConfig(task_type="CAUSAL_LM", num_virtual_tokens=P,
                                                        encoder_hidden_size=16),
        "ptuning_lstm": lambda: peft.PromptEncoderConfig(task_type="CAUSAL_LM", num_virtual_tokens=P,
                                                         encoder_hidden_size=16, encoder_reparameterization_type="LSTM"),
    }


@pytest.mark.parametrize("kind", ["prompt", "prefix", "ptuning_v2", "ptuning_mlp", "ptuning_lstm"])
def test_peft_adapter_loads_in_lmforge_with_equal_logits(kind, hf_dir, tmp_path):
    import peft

    torch.manual_seed(6)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = peft.get_peft_model(_hf(hf_dir), _peft_configs()[kind]()).eval()
        theirs.save_pretrained(tmp_path)
    ours = load_adapter(Transformer.from_pretrained(hf_dir).eval(), tmp_path)
    method = kind.split("_")[0] if kind.startswith("ptuning_") and kind != "ptuning_v2" else kind
    with torch.no_grad():
        expected = _real_logits(method, theirs(input_ids=IDS).logits)
        got = ours(IDS)
        base = _hf(hf_dir)(IDS).logits
    diff = (got - expected).abs().max().item()
    print(f"peft -> lmforge [{kind}]: max abs diff {diff:.2e}")
    assert (expected - base).abs().max().item() > 0.1 and diff <= 1e-4


# ----- lmforge finetune end to end ------------------------------------------------------------------------
pytestmark = pytest.mark.usefixtures("restore_threads")
run_module = importlib.import_module("lmforge.finetune.run")


def _cli_args(base: dict, out: Path, *extra: str) -> list[str]:
    return ["finetune", *finetune_args(base, out, "train.lr=3e-1", "train.max_steps=20",
                                       "finetune.num_virtual_tokens=4", "finetune.encoder_hidden_size=16", *extra)]


def _capture(monkeypatch) -> dict:
    seen = {}
    real = run_module.apply_method

    def recording(model, section, lr, wd, **kw):
        seen["base"] = {k: v.detach().clone() for k, v in model.state_dict().items()}
        seen["prepared"] = real(model, section, lr, wd, **kw)
        return seen["prepared"]

    monkeypatch.setattr(run_module, "apply_method", recording)
    return seen


# On this random base (val loss ≈ ln(vocab)) virtual *input* embeddings reach the real tokens only through
# the small random attention weights, so prompt/ptuning move the loss less than per-layer K/V do.
@pytest.mark.parametrize("method,drop,extra", [
    ("prefix", 0.05, ()), ("ptuning_v2", 0.05, ()), ("ptuning", 0.01, ("finetune.encoder_type=lstm",)),
    ("prompt", 0.01, ("train.lr=1.0",)),
    ("prompt", 0.005, ("finetune.prompt_init=text", "finetune.prompt_init_text=The answer is"))])
def test_finetune_cli_trains_each_method_and_the_adapter_reloads(method, drop, extra, sft_base, tmp_path, monkeypatch):
    from lmforge.cli import main

    seen = _capture(monkeypatch)
    out = tmp_path / method
    assert main(_cli_args(sft_base, out, f"finetune.method={method}", *extra)) == 0
    summary = json.loads((out / "summary.json").read_text())
    print(f"{method}: val_loss {summary['initial_val']['val_loss']:.3f} -> {summary['val_loss']:.3f}, "
          f"trainable {summary['trainable_share']:.2%}")
    assert summary["val_loss"] < summary["initial_val"]["val_loss"] - drop
    assert 0 < summary["trainable_share"] < 0.2
    trained = seen["prepared"].model.eval()
    for name, before in seen["base"].items():
        if not name.startswith("prompt_encoder."):
            assert torch.equal(trained.state_dict()[name], before), f"frozen {name} changed"
    reloaded = load_adapter(Transformer.from_pretrained(sft_base["model"]), summary["adapter_dir"]).eval()
    ids = torch.tensor([[5, 17, 33, 2, 90, 41, 7, 8]])
    with torch.no_grad():
        assert torch.equal(reloaded(ids), trained(ids))
    config = json.loads((Path(summary["adapter_dir"]) / "adapter_config.json").read_text())
    assert config["num_virtual_tokens"] == 4


def test_finetune_refuses_packing_and_merge(sft_base, tmp_path, capsys):
    from lmforge.cli import main

    assert main(_cli_args(sft_base, tmp_path / "a", "finetune.method=prompt", "data.packing=true")) == 2
    assert "data.packing=false" in capsys.readouterr().err
    assert main(_cli_args(sft_base, tmp_path / "b", "finetune.method=prefix", "finetune.merge=true")) == 2
    assert "finetune.merge=false" in capsys.readouterr().err


@pytest.mark.parametrize("method,extra", [("prefix", ()), ("ptuning", ("finetune.encoder_type=lstm",)), ("prompt", ())])
def test_resume_reproduces_losses(method, extra, sft_base, tmp_path, monkeypatch):
    """Crash in step 5 after the step-4 checkpoint (adapter + encoder), resume, compare every step's loss."""
    from lmforge.cli import main

    extra = (f"finetune.method={method}", "train.max_steps=6", "train.save_every=2", *extra)
    assert main(_cli_args(sft_base, tmp_path / "full", *extra)) == 0
    crash_during(monkeypatch, "lmforge.finetune.run", 5, lambda: main(_cli_args(sft_base, tmp_path / "crashed", *extra)))
    assert (tmp_path / "crashed" / "checkpoints" / "latest").read_text().strip() == "step-4"
    assert main(_cli_args(sft_base, tmp_path / "crashed", *extra, "train.resume=auto")) == 0
    assert step_losses(tmp_path / "crashed") == step_losses(tmp_path / "full")
