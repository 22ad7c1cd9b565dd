"""LoRA recovery after compression: training, frozen bases, save/load/merge, validation (tiny models, CPU)."""

from __future__ import annotations

import copy
import json
from functools import cache
from itertools import chain

import pytest
import torch

import eigenkv
from eigenkv import EigenConfig, KVQuantConfig, Recipe, compress_model
from eigenkv.compress.attention import EigenAttention
from eigenkv.compress.families import attention_sites
from eigenkv.data import TokenWindows
from tests.helpers import char_tokenizer, random_windows, tiny_llama, tiny_mpt, tiny_opt

pytest.importorskip("peft")

from eigenkv.finetune import (  # noqa: E402  (after the peft check)
    LoraRecovery,
    finetune,
    load_adapters,
    lora_targets,
    merge_adapters,
    read_record,
    recovery_of,
    save_adapters,
)

TEXT = "It was the best of times, it was the worst of times, it was the age of wisdom.\n" * 20
QUANTIZED = Recipe(lowrank=EigenConfig(target_ratio=0.3, allot="uniform"), kv=KVQuantConfig(bits=2, group_size=8))
TRAIN = LoraRecovery(steps=20, rank=4, lr=1e-2)


def text_windows(count: int = 8, length: int = 48) -> TokenWindows:
    """``count`` windows of repetitive English, character tokens (a pattern the adapters can learn)."""
    ids = torch.tensor(char_tokenizer()(TEXT)["input_ids"][: count * length]).view(count, length)
    return TokenWindows(ids, "text", length, "none", 0, count)


def original_llama():
    return tiny_llama(vocab_size=len(char_tokenizer()))


@cache
def plan_of(lowrank: EigenConfig):
    """The plan of the tiny Llama for ``lowrank``, calibrated on two windows of the training text (made once)."""
    return compress_model(original_llama(), text_windows(count=2), lowrank, progress=False, apply=False)


def compressed_llama(recipe: Recipe = QUANTIZED):
    """(the original tiny Llama, a compressed copy, the training windows)."""
    original = original_llama()
    compressed = eigenkv.apply_recipe(copy.deepcopy(original), recipe, plan=plan_of(recipe.lowrank))
    return original, compressed, text_windows()


def base_state(model) -> dict[str, torch.Tensor]:
    """Every parameter and buffer but the adapters', under its name without peft's ``base_layer``."""
    named = chain(model.named_parameters(), model.named_buffers())
    return {n.replace(".base_layer", ""): t.detach().clone() for n, t in named if "lora_" not in n}


def logits(model, ids) -> torch.Tensor:
    with torch.no_grad():
        return model(ids, use_cache=False).logits


def has_lora(model) -> bool:
    return any("lora_" in name for name, _ in model.named_parameters())


def test_adapters_train_and_leave_the_compressed_model_as_it_was():
    _, compressed, windows = compressed_llama()
    model = compressed.model
    before = base_state(model)
    fresh = copy.deepcopy(compressed)
    kv_bytes = compressed.kv_bytes(seq_len=64)
    rng = torch.random.get_rng_state()

    recovery = finetune(compressed, windows, TRAIN, progress=False)

    losses = recovery.losses
    assert len(losses) == 20 and all(torch.isfinite(torch.tensor(losses)))
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5 - 0.1, losses
    after = base_state(model)
    assert after.keys() == before.keys()
    for name, tensor in before.items():  # folded weights, bases (key_basis, ...), norms, embeddings: bit-identical
        assert torch.equal(after[name], tensor), name
    assert any(name.endswith("key_basis") for name in before)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable)
    assert any(p.abs().sum() > 0 for n, p in model.named_parameters() if ".lora_B." in n)  # B starts at zero
    shapes = recovery.targets
    assert len(shapes) == 8 and recovery.trainable_parameters == sum(4 * (i + o) for i, o in shapes.values())
    assert recovery.model.base_model.model is model and compressed.model is model
    assert recovery_of(compressed) is recovery
    assert not model.training and recovery.seconds > 0 and recovery.evaluations == []
    assert torch.equal(torch.random.get_rng_state(), rng)  # the global RNG is left alone

    # the rest of eigenkv still sees the compressed model: its attention modules, the quantized cache, its bytes
    assert all(isinstance(site.module, EigenAttention) for site in attention_sites(model))
    assert compressed.kv_bytes(seq_len=64) == kv_bytes
    ids = windows.input_ids[:2, :32]
    cache = compressed.new_cache()
    with compressed, torch.no_grad():
        quantized = model(ids, past_key_values=cache, use_cache=True).logits
    plain = logits(model, ids)
    assert torch.isfinite(quantized).all() and not torch.allclose(quantized, plain, atol=1e-3)
    assert not torch.allclose(plain, logits(fresh.model, ids), atol=1e-4)  # the adapters act

    # trained without the quantized cache, the model reading it recovers too
    recovered, before = (eigenkv.perplexity(c, windows, progress=False).nll for c in (compressed, fresh))
    assert recovered < before - 0.1

    again = finetune(fresh, windows, TRAIN, progress=False)  # deterministic with the seed
    assert again.losses == losses
    torch.testing.assert_close(logits(fresh.model, ids), plain, atol=0, rtol=0)


def test_save_beside_the_compressed_model_load_and_merge(tmp_path):
    _, compressed, windows = compressed_llama(Recipe(lowrank=EigenConfig(target_ratio=0.5, allot="uniform")))
    folder = compressed.save_pretrained(tmp_path / "saved")  # the model first, the adapters after training
    recovery = finetune(compressed, windows, LoraRecovery(steps=6, rank=4, lr=1e-2, eval_every=3), progress=False)
    assert save_adapters(recovery, folder) == folder
    assert {p.name for p in (folder / "adapters").iterdir()} >= {"adapter_config.json", "adapter_model.safetensors"}
    record = read_record(folder)
    assert record["losses"] == recovery.losses and LoraRecovery.from_dict(record["config"]) == recovery.config
    ids = windows.input_ids[:2, :40]
    trained = logits(compressed.model, ids)

    loaded = load_adapters(eigenkv.from_pretrained(folder), folder)  # the saved model still passes its checksums
    torch.testing.assert_close(logits(loaded.model, ids), trained, atol=0, rtol=0)
    assert recovery_of(loaded).losses == recovery.losses and recovery_of(loaded).config == recovery.config
    assert not loaded.model.training

    merged = load_adapters(eigenkv.from_pretrained(folder), folder, merge=True)
    assert not has_lora(merged.model)
    assert all(type(m).__name__ == "Linear" for n, m in merged.model.named_modules() if n.endswith("_proj"))
    torch.testing.assert_close(logits(merged.model, ids), trained, atol=2e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="has no LoRA adapters"):
        recovery_of(merged)

    merge_adapters(compressed)  # the trained model itself: merged equals the unmerged wrapper
    torch.testing.assert_close(logits(compressed.model, ids), trained, atol=2e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="merged into the weights"):
        save_adapters(recovery, tmp_path / "again")
    standalone = compressed.save_pretrained(tmp_path / "merged")  # merged: a plain compressed model again
    torch.testing.assert_close(logits(eigenkv.from_pretrained(standalone).model, ids), logits(compressed.model, ids))

    with pytest.raises(FileExistsError, match="already holds adapters"):
        save_adapters(recovery_of(loaded), folder)
    save_adapters(recovery_of(loaded), folder, overwrite=True)
    assert read_record(folder)["losses"] == recovery.losses


def test_loading_refuses_other_models_and_edited_or_missing_adapters(tmp_path):
    original, compressed, windows = compressed_llama(Recipe(lowrank=EigenConfig(target_ratio=0.6, allot="uniform")))
    finetune(compressed, windows, LoraRecovery(steps=2, rank=4), progress=False)
    save_adapters(compressed, tmp_path / "a")

    smaller = eigenkv.apply_recipe(copy.deepcopy(original), QUANTIZED, plan=plan_of(QUANTIZED.lowrank))
    with pytest.raises(ValueError, match=r"do not fit this model.*eigen0\.6.*v_proj: adapters \(in, out\)"):
        load_adapters(smaller, tmp_path / "a")
    assert not has_lora(smaller.model)
    with pytest.raises(ValueError, match="not in this model"):
        load_adapters(eigenkv.apply_recipe(tiny_opt(), Recipe()), tmp_path / "a")
    with pytest.raises(ValueError, match="already has LoRA adapters"):
        load_adapters(compressed, tmp_path / "a")
    with pytest.raises(ValueError, match="already has LoRA adapters"):
        finetune(compressed, windows, TRAIN, progress=False)
    with pytest.raises(FileNotFoundError, match="holds no LoRA adapters"):
        load_adapters(smaller, tmp_path)

    weights = tmp_path / "a" / "adapters" / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-4] + b"\0" * 4)
    with pytest.raises(ValueError, match="was modified after it was saved with the adapters"):
        load_adapters(smaller, tmp_path / "a")
    record = json.loads((tmp_path / "a" / "finetune.json").read_text())
    record["losses"][0] = 0.0
    (tmp_path / "a" / "finetune.json").write_text(json.dumps(record))
    with pytest.raises(ValueError, match="edited after it was written"):
        load_adapters(smaller, tmp_path / "a")


def test_evaluate_is_called_before_training_every_eval_every_steps_and_at_the_end():
    _, compressed, windows = compressed_llama()
    seen = []

    def evaluate(model):
        seen.append((model.training, torch.is_grad_enabled()))
        return float(len(seen))

    recovery = finetune(compressed, windows, LoraRecovery(steps=7, rank=2, eval_every=3), evaluate=evaluate,
                        progress=False)  # fmt: skip
    assert recovery.evaluations == [(0, 1.0), (3, 2.0), (6, 3.0), (7, 4.0)]
    assert seen == [(False, False)] * 4
    merge_adapters(compressed)
    config = LoraRecovery(steps=4, rank=2, eval_every=2)
    recovery = finetune(compressed, windows, config, evaluate=lambda m: 0.0, progress=False)
    assert [step for step, _ in recovery.evaluations] == [0, 2, 4]  # the end is not evaluated twice

    _, fresh, _ = compressed_llama()

    def failing(model):
        if has_lora(model) and len(seen) > 4:
            raise RuntimeError("evaluation failed")
        seen.append(None)
        return 0.0

    with pytest.raises(RuntimeError, match="evaluation failed"):
        finetune(fresh, windows, LoraRecovery(steps=4, rank=2, eval_every=2), evaluate=failing, progress=False)
    assert not has_lora(fresh.model) and all(p.requires_grad for p in fresh.model.parameters())  # as it was
    with pytest.raises(ValueError, match="has no LoRA adapters"):
        recovery_of(fresh)


def test_targets_are_the_attention_and_mlp_linears_of_each_decoder_layer():
    _, compressed, _ = compressed_llama()
    attention = lora_targets(compressed.model)
    assert attention == [f"model.layers.{i}.self_attn.{p}_proj" for i in range(2) for p in "qkvo"]
    both = lora_targets(compressed.model, "attention+mlp")
    mlp = [f"model.layers.{i}.mlp.{p}_proj" for i in range(2) for p in ("gate", "up", "down")]
    assert set(both) == set(attention) | set(mlp) and len(both) == 14
    assert lora_targets(tiny_opt(), "attention+mlp") == [
        f"model.decoder.layers.{i}.{name}"
        for i in range(2)
        for name in ("self_attn.k_proj", "self_attn.v_proj", "self_attn.q_proj", "self_attn.out_proj", "fc1", "fc2")
    ]
    mpt = lora_targets(tiny_mpt(), "attention+mlp")
    assert mpt == [f"transformer.blocks.{i}.{n}" for i in range(2) for n in ("attn.Wqkv", "attn.out_proj",
                                                                          "ffn.up_proj", "ffn.down_proj")]  # fmt: skip
    with pytest.raises(ValueError, match="found no decoder-layer attention modules"):
        lora_targets(torch.nn.Sequential(torch.nn.Linear(4, 4)))
    with pytest.raises(ValueError, match="targets must be one of"):
        lora_targets(compressed.model, "mlp")


@pytest.mark.parametrize("family", ["opt", "mpt"])
def test_opt_and_mpt_attention_and_mlp_adapters_train_and_merge(family):
    model = tiny_opt() if family == "opt" else tiny_mpt()
    windows = random_windows(model, count=4, length=32)
    recipe = Recipe(lowrank=EigenConfig(target_ratio=0.5, allot="uniform"))
    compressed = eigenkv.apply_recipe(model, recipe, windows, progress=False)
    config = LoraRecovery(steps=4, rank=2, lr=1e-2, targets="attention+mlp", dropout=0.1)
    recovery = finetune(compressed, windows, config, progress=False)
    kinds = {"opt": {"q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"},
             "mpt": {"Wqkv", "out_proj", "up_proj", "down_proj"}}  # fmt: skip
    assert {name.rpartition(".")[2] for name in recovery.targets} == kinds[family]
    assert all(isinstance(site.module, EigenAttention) for site in attention_sites(model)) and not model.training
    ids = windows.input_ids[:2]
    unmerged = logits(model, ids)
    merge_adapters(compressed)
    assert not has_lora(model)
    torch.testing.assert_close(logits(model, ids), unmerged, atol=2e-5, rtol=1e-5)


def test_config_is_validated_and_round_trips():
    config = LoraRecovery(steps=100, rank=16, alpha=32, targets="attention+mlp", warmup=10, eval_every=25)
    data = json.loads(json.dumps(config.to_dict()))
    assert data["version"] == 1 and LoraRecovery.from_dict(data) == config
    assert LoraRecovery.from_dict({"version": 1, "steps": 5}) == LoraRecovery(steps=5)
    assert config.label() == "lora-r16-a32-attention+mlp-100steps"
    bad = [
        ({"steps": 0}, "steps must be >= 1"),
        ({"steps": 10.0}, "steps must be an integer"),
        ({"steps": 10, "rank": 0}, "rank must be >= 1"),
        ({"steps": 10, "alpha": 0}, r"alpha must be in \(0, inf\]"),
        ({"steps": 10, "dropout": 1.0}, r"dropout must be in \[0, 1\)"),
        ({"steps": 10, "targets": "mlp"}, "targets must be one of"),
        ({"steps": 10, "lr": -1e-4}, "lr must be in"),
        ({"steps": 10, "batch_size": True}, "batch_size must be an integer"),
        ({"steps": 10, "warmup": 11}, "warmup .* is longer than the training"),
        ({"steps": 10, "eval_every": -1}, "eval_every must be >= 0"),
        ({"steps": 10, "weight_decay": float("nan")}, "weight_decay must be a finite number"),
    ]
    for kwargs, message in bad:
        with pytest.raises(ValueError, match=message):
            LoraRecovery(**kwargs)
    with pytest.raises(ValueError, match=r"unknown LoRA recovery config fields \['ranks'\]"):
        LoraRecovery.from_dict({"version": 1, "steps": 5, "ranks": 8})
    with pytest.raises(ValueError, match="version 2 is not supported"):
        LoraRecovery.from_dict({**data, "version": 2})
    with pytest.raises(ValueError, match="needs steps"):
        LoraRecovery.from_dict({"version": 1})

    _, compressed, windows = compressed_llama()
    with pytest.raises(ValueError, match=r"batch_size \(9\) exceeds the number of training windows \(8\)"):
        finetune(compressed, windows, LoraRecovery(steps=1, batch_size=9), progress=False)
    with pytest.raises(TypeError, match="config must be a LoraRecovery"):
        finetune(compressed, windows, {"steps": 1}, progress=False)
    with pytest.raises(TypeError, match="on a CompressedModel"):
        finetune(compressed.model, windows, TRAIN, progress=False)
    assert not has_lora(compressed.model)


def test_training_takes_the_differentiable_attention_path_where_kernels_would_serve(monkeypatch):
    """In fp16/bf16 on CUDA the compressed attention runs eigenkv's kernels, which have no backward: the
    training forwards, recorded by autograd, go through PyTorch (on CPU: the kernels forced by
    EIGENKV_BACKEND=triton, interpreted)."""
    import eigenkv.quant.routing as routing

    served = []
    kernel_attention = routing.kernel_attention
    monkeypatch.setattr(routing, "kernel_attention", lambda *a, **k: served.append(1) or kernel_attention(*a, **k))
    monkeypatch.setenv("EIGENKV_BACKEND", "triton")
    _, compressed, windows = compressed_llama()
    compressed.model.to(torch.bfloat16)
    seen = []

    def evaluate(model):  # evaluations take the kernels, as deployed
        before = len(served)
        logits(model, windows.input_ids[:1, :16])
        seen.append(len(served) > before)
        return 0.0

    finetune(compressed, windows, LoraRecovery(steps=2, rank=2, lr=1e-2), evaluate=evaluate, progress=False)
    assert seen == [True, True]
    assert len(served) == 2 * 2  # the two evaluations' layers, no training forward
    for name, p in compressed.model.named_parameters():
        if ".lora_B." in name:  # zero at first: every adapter, query and key ones included, was trained
            assert p.abs().sum() > 0, name


def test_save_pretrained_refuses_a_model_with_unmerged_adapters(tmp_path):
    _, compressed, windows = compressed_llama()
    finetune(compressed, windows, LoraRecovery(steps=1, rank=2), progress=False)
    with pytest.raises(ValueError, match="carries LoRA adapters.*merge them first"):
        compressed.save_pretrained(tmp_path / "saved")
    assert not (tmp_path / "saved").exists()
    merge_adapters(compressed)
    compressed.save_pretrained(tmp_path / "saved")
    torch.testing.assert_close(
        logits(eigenkv.from_pretrained(tmp_path / "saved").model, windows.input_ids[:1]),
        logits(compressed.model, windows.input_ids[:1]),
    )


def test_autograd_through_the_query_keeps_attention_off_the_kernels():
    from eigenkv.quant.routing import kernels_apply

    query = torch.zeros(1, 2, 3, 8, dtype=torch.bfloat16, requires_grad=True)
    with torch.no_grad():
        served_without_grad = kernels_apply(query)
    assert not kernels_apply(query)  # recorded by autograd: the kernels have no backward
    assert kernels_apply(query.detach()) == served_without_grad
