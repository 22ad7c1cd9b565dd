"""Models spread over devices by accelerate (``load_model(..., device_map=...)``): each decoder layer on its own
device, some with offloaded weights (on ``meta`` until their hooks load them). Every step of a recipe must give
what it gives on one device: calibration, folding, the quantized cache, its byte accounting.

Without a GPU the layers compute on the CPU, with layer 0's weights offloaded to CPU memory (as a ``"cpu"`` entry
is on a GPU machine) and layer 1's, the embeddings' and the head's to disk."""

from __future__ import annotations

import dataclasses

import pytest
import torch

import eigenkv
from eigenkv import EigenConfig, KVQuantConfig, Recipe
from eigenkv.compress import is_compressed
from eigenkv.compress.calibrate import calibrate
from eigenkv.compress.signature import model_signature
from eigenkv.devices import input_device, is_offloaded, layer_devices
from eigenkv.graphs import _graph_obstacle
from eigenkv.memory import AttentionShape, cache_held_bytes, kv_cache_bytes, quantized_layout
from eigenkv.models import load_model
from eigenkv.quant.cache import QuantizedKVCache
from tests.helpers import parallel_and_stepwise, random_tokens, random_windows, tiny_llama

accelerate = pytest.importorskip("accelerate")

SPREAD = {
    "model.embed_tokens": "disk",
    "model.layers.0": "cpu",
    "model.layers.1": "disk",
    "model.norm": "cpu",
    "model.rotary_emb": "cpu",
    "lm_head": "disk",
}
LOWRANK = EigenConfig(target_ratio=0.6, allot="uniform")
KV = KVQuantConfig(bits=4, group_size=16)


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """These tiny models gain nothing from intra-op threads, whose spinning costs several times their work on
    a loaded machine; the setting is restored after the module."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def load_spread(model_dir, offload_folder):
    """The model with layer 0's weights offloaded to CPU memory and layer 1's (and the embeddings' and the
    head's) to disk, every layer computing on the CPU."""
    model, _ = load_model(model_dir, device_map=SPREAD, offload_folder=offload_folder)
    # what a "cpu" entry does on a GPU machine: weights on meta, held in CPU memory, loaded for each forward
    accelerate.cpu_offload(model.model.layers[0], execution_device="cpu")
    return model


def attention_devices(model) -> set[str]:
    return {p.device.type for layer in model.model.layers for p in layer.self_attn.parameters()}


def test_load_model_spreads_the_layers_and_refuses_unclear_placements(model_dir, tmp_path):
    one, _ = load_model(model_dir)
    model = load_spread(model_dir, tmp_path / "offload")
    assert is_offloaded(model) and not is_offloaded(one)
    assert attention_devices(model) == {"meta"}  # every attention weight offloaded
    assert layer_devices(model) == {0: torch.device("cpu"), 1: torch.device("cpu")}
    assert input_device(model) == torch.device("cpu")  # the embeddings are offloaded, not on meta
    ids = random_tokens(one, batch=2, length=16)
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, one(ids).logits, atol=0, rtol=0)
    with pytest.raises(ValueError, match="both place the model"):
        load_model(model_dir, device="cuda:0", device_map="auto")
    with pytest.raises(ValueError, match="device_map must be one of"):
        load_model(model_dir, device_map="everywhere")
    with pytest.raises(ValueError, match="pass offload_folder"):
        load_model(model_dir, device_map=SPREAD)
    with pytest.raises(ValueError, match="pass device_map"):
        load_model(model_dir, offload_folder=tmp_path / "offload")


@pytest.mark.parametrize("mode", ["pre", "post"])
def test_lowrank_quantized_recipe_gives_the_logits_and_bytes_of_one_device(model_dir, tmp_path, mode):
    recipe = Recipe(lowrank=dataclasses.replace(LOWRANK, rope_mode=mode), kv=KV)
    one, _ = load_model(model_dir)
    windows = random_windows(one, count=2, length=32)
    reference = eigenkv.apply_recipe(one, recipe, windows, progress=False)
    model = load_spread(model_dir, tmp_path / "offload")
    spread = eigenkv.apply_recipe(model, recipe, windows, progress=False)  # calibrated on the spread model
    assert spread.plan.ranks == reference.plan.ranks
    assert spread.plan.signature == reference.plan.signature
    assert is_compressed(model) and attention_devices(model) == {"meta"}  # the folded weights stay offloaded
    assert list((tmp_path / "offload").glob("eigenkv-folded-*.dat"))  # layer 1's, on disk beside its others

    ids = random_tokens(one, batch=2, length=24)
    with reference:
        expected = parallel_and_stepwise(one, reference.new_cache, ids)
    with spread:
        parallel, stepwise, cache = parallel_and_stepwise(model, spread.new_cache, ids)
    torch.testing.assert_close(parallel, expected[0], atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(stepwise, expected[1], atol=1e-6, rtol=1e-6)
    counted = spread.kv_bytes(seq_len=24, batch_size=2, dtype=torch.float32)
    assert counted == reference.kv_bytes(seq_len=24, batch_size=2, dtype=torch.float32)
    assert cache_held_bytes(cache) == counted.total - counted.components.get("bases", 0)
    prompt = ids[:1, :8]
    assert torch.equal(spread.generate(prompt, max_new_tokens=4, do_sample=False),
                       reference.generate(prompt, max_new_tokens=4, do_sample=False))  # fmt: skip


def test_a_plan_made_on_one_device_applies_to_the_spread_model(model_dir, tmp_path):
    recipe = Recipe(lowrank=LOWRANK, kv=KV)
    one, _ = load_model(model_dir)
    reference = eigenkv.apply_recipe(one, recipe, random_windows(one, count=2, length=32), progress=False)
    model = load_spread(model_dir, tmp_path / "offload")
    spread = eigenkv.apply_recipe(model, recipe, plan=reference.plan)  # the weight digests match through offload
    ids = random_tokens(one, batch=1, length=20)
    with reference, spread, torch.no_grad():
        expected = one(ids, past_key_values=reference.new_cache(), use_cache=True).logits
        torch.testing.assert_close(model(ids, past_key_values=spread.new_cache(), use_cache=True).logits, expected)


def test_an_attention_module_offloaded_as_a_whole(model_dir):
    """accelerate's ``preload_module_classes``: one hook on the attention module loads every projection's
    weights (the projections have no hook of their own); calibration and folding load them through it."""
    recipe = Recipe(lowrank=LOWRANK, kv=KV)
    one, _ = load_model(model_dir)
    windows = random_windows(one, count=2, length=32)
    reference = eigenkv.apply_recipe(one, recipe, windows, progress=False)
    model, _ = load_model(model_dir)
    for layer in model.model.layers:
        accelerate.cpu_offload(layer, execution_device="cpu", preload_module_classes=["LlamaAttention"])
    assert attention_devices(model) == {"meta"}
    spread = eigenkv.apply_recipe(model, recipe, windows, progress=False)
    assert spread.plan.ranks == reference.plan.ranks and attention_devices(model) == {"meta"}
    ids = random_tokens(one, batch=2, length=20)
    with reference, spread, torch.no_grad():
        expected = one(ids, past_key_values=reference.new_cache(), use_cache=True).logits
        got = model(ids, past_key_values=spread.new_cache(), use_cache=True).logits
    torch.testing.assert_close(got, expected, atol=1e-6, rtol=1e-6)


def test_calibration_with_gradients_matches_one_device(model_dir, tmp_path):
    one, _ = load_model(model_dir)
    model = load_spread(model_dir, tmp_path / "offload")
    windows = random_windows(one, count=2, length=24)
    expected = calibrate(one, windows, gradients=True, progress=False)
    got = calibrate(model, windows, gradients=True, progress=False)
    assert got.signature == expected.signature == model_signature(one)
    for a, b in zip(got.layers, expected.layers, strict=True):
        for name in ("queries", "keys", "values"):
            torch.testing.assert_close(getattr(a, name), getattr(b, name), atol=0, rtol=0)
        for x, y in zip(a.gradients, b.gradients, strict=True):
            torch.testing.assert_close(x, y, atol=0, rtol=0)


@pytest.mark.parametrize("rotate", [False, True])
def test_quantization_alone_gives_the_logits_and_bytes_of_one_device(model_dir, tmp_path, rotate):
    recipe = Recipe(kv=KVQuantConfig(bits=4, group_size=16, rotate=rotate))
    one, _ = load_model(model_dir)
    reference = eigenkv.apply_recipe(one, recipe)
    spread = eigenkv.apply_recipe(load_spread(model_dir, tmp_path / "offload"), recipe)
    ids = random_tokens(one, batch=2, length=24)
    with reference:
        expected = parallel_and_stepwise(one, reference.new_cache, ids)
    with spread:
        parallel, stepwise, cache = parallel_and_stepwise(spread.model, spread.new_cache, ids)
    torch.testing.assert_close(parallel, expected[0], atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(stepwise, expected[1], atol=1e-6, rtol=1e-6)
    counted = spread.kv_bytes(seq_len=24, batch_size=2, dtype=torch.float32)
    assert counted == reference.kv_bytes(seq_len=24, batch_size=2, dtype=torch.float32)
    assert cache_held_bytes(cache) == counted.total


def test_what_cannot_handle_offloaded_weights_refuses_them(model_dir, tmp_path):
    model = load_spread(model_dir, tmp_path / "offload")
    windows = random_windows(model, count=2, length=24)
    with pytest.raises(ValueError, match="bitsandbytes weight quantization needs every weight in memory"):
        eigenkv.apply_recipe(model, Recipe(lowrank=LOWRANK, kv=KV, weights="int8"), windows, progress=False)
    assert not is_compressed(model)  # refused before anything changed
    compressed = eigenkv.apply_recipe(model, Recipe(lowrank=LOWRANK, kv=KV), windows, progress=False)
    with pytest.raises(ValueError, match="save_pretrained needs every weight in memory.*plan=compressed.plan"):
        compressed.save_pretrained(tmp_path / "saved")
    assert not (tmp_path / "saved").exists()
    assert "offloaded weights" in _graph_obstacle(model)  # generate_static decodes such a model eagerly
    assert _graph_obstacle(load_model(model_dir)[0]) is None


def test_a_rotated_cache_counts_its_matrix_once_per_device():
    shape = AttentionShape(layers=3, q_heads=4, kv_heads=2, head_dim=16)
    config = KVQuantConfig(bits=4, group_size=16, rotate=True)
    one = quantized_layout(shape, config).fixed["rotation"]
    assert one == 16 * 16 * 4
    cuda = [torch.device("cuda", i) for i in (0, 1, 1)]
    assert quantized_layout(shape, config, devices=dict(enumerate(cuda))).fixed["rotation"] == 2 * one
    cache = QuantizedKVCache(config, tiny_llama().config)
    assert cache.rotation(16, "cpu") is cache.rotation(16, torch.device("cpu"))  # one matrix per device
    model = tiny_llama()
    assert kv_cache_bytes(model, quant=config).components["rotation"] == one


def _tensors(obj, seen=None):
    """Every tensor reachable from ``obj``'s attributes (a cache stream's buffers)."""
    seen = set() if seen is None else seen
    if id(obj) in seen:
        return
    seen.add(id(obj))
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, (list, tuple)):
        for x in obj:
            yield from _tensors(x, seen)
    elif isinstance(obj, dict):
        for x in obj.values():
            yield from _tensors(x, seen)
    elif hasattr(obj, "__dict__") and not isinstance(obj, (type, torch.nn.Module)):
        for x in vars(obj).values():
            yield from _tensors(x, seen)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("placement", ["offloaded", "split"])
def test_layers_on_cpu_and_cuda(model_dir, placement):
    """bfloat16, so that the GPU layers take the attention kernels. ``offloaded``: layer 0's weights in CPU
    memory, every layer computing on the GPU (a ``"cpu"`` entry); ``split``: layer 0 computes on the CPU, layer
    1 on the GPU (the model's RoPE on the CPU). Compared with the same plan on one GPU."""
    cuda = torch.device("cuda", torch.cuda.current_device())
    recipe = Recipe(lowrank=LOWRANK, kv=KVQuantConfig(bits=8, group_size=16))
    calibrated, _ = load_model(model_dir)  # calibrated once, in float32; the plan serves the bfloat16 copies
    plan = eigenkv.apply_recipe(calibrated, recipe, random_windows(calibrated, count=2, length=32), progress=False).plan
    one, _ = load_model(model_dir, dtype="bfloat16", device=cuda)
    reference = eigenkv.apply_recipe(one, recipe, plan=plan)
    if placement == "offloaded":
        rest = {name: cuda.index for name in SPREAD}
        model, _ = load_model(model_dir, dtype="bfloat16", device_map={**rest, "model.layers.0": "cpu"})
        devices = {0: cuda, 1: cuda}
        tolerance = {"atol": 1e-2, "rtol": 1e-2}  # the same operations on the same device
    else:
        placement_map = {name: "cpu" for name in SPREAD} | {"model.layers.1": cuda.index, "lm_head": cuda.index}
        model = accelerate.dispatch_model(load_model(model_dir, dtype="bfloat16")[0], placement_map, main_device="cpu")
        devices = {0: torch.device("cpu"), 1: cuda}
        tolerance = {"atol": 5e-2, "rtol": 5e-2}  # layer 0 on the CPU's PyTorch path, in bfloat16
    assert layer_devices(model) == devices
    spread = eigenkv.apply_recipe(model, recipe, plan=plan)
    assert layer_devices(model) == devices
    ids = random_tokens(one, batch=2, length=24)
    with reference:
        expected = parallel_and_stepwise(one, reference.new_cache, ids.to(cuda))
    with spread:
        parallel, stepwise, cache = parallel_and_stepwise(model, spread.new_cache, ids.to(input_device(model)))
    torch.testing.assert_close(parallel.float().cpu(), expected[0].float().cpu(), **tolerance)
    torch.testing.assert_close(stepwise.float().cpu(), expected[1].float().cpu(), **tolerance)
    for index, layer in enumerate(cache.layers):  # each layer's streams live on that layer's device
        assert {t.device for stream in layer.streams() for t in _tensors(stream)} == {devices[index]}
    counted = spread.kv_bytes(seq_len=24, batch_size=2, dtype=torch.bfloat16)
    assert cache_held_bytes(cache) == counted.total - counted.components.get("bases", 0)
    prompt = ids[:, :8].to(input_device(model))
    if placement == "offloaded":
        assert attention_devices(model) == {"meta", cuda.type}  # layer 0's folded weights stay offloaded
        with pytest.raises(ValueError, match="offloaded weights"):
            spread.generate_static(prompt, 4, cuda_graph=True)
        out = spread.generate_static(prompt, 4)
        assert not out.graphed and "offloaded weights" in out.reason
    else:  # a rotated cache keeps its Hadamard matrix on both devices, and counts both
        assert not spread.generate_static(prompt, 4).graphed  # (the prompt is on the CPU: no graph either way)
        assert "several devices" in _graph_obstacle(model)
        plain = accelerate.dispatch_model(load_model(model_dir, dtype="bfloat16")[0], placement_map, main_device="cpu")
        quantized = eigenkv.apply_recipe(plain, Recipe(kv=KVQuantConfig(bits=4, group_size=16, rotate=True)))
        with quantized, torch.no_grad():
            cache = quantized.new_cache()
            plain(ids, past_key_values=cache, use_cache=True)
        assert cache.nbytes()["rotation"] == 2 * 16 * 16 * 4
        assert quantized.kv_bytes(seq_len=24, batch_size=2).components["rotation"] == 2 * 16 * 16 * 4
