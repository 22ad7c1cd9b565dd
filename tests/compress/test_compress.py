"""Eigen Attention on tiny random OPT, MPT and Llama (GQA) models: identity, ratios, decoding, artifacts."""

import contextlib
import copy
import json

import pytest
import torch
from transformers import DynamicCache

from eigenkv.compress import EigenConfig, EigenPlan, apply_plan, compress_model, is_compressed
from eigenkv.compress.attention import EigenAttention, fused_rows
from eigenkv.compress.families import attention_sites
from eigenkv.data import TokenWindows
from eigenkv.memory import cache_held_bytes, kv_cache_bytes
from tests.helpers import (
    random_tokens,
    random_windows,
    tiny_gemma2,
    tiny_gemma3,
    tiny_gptneox,
    tiny_llama,
    tiny_llama3_scaled,
    tiny_mistral,
    tiny_mpt,
    tiny_olmo2,
    tiny_opt,
    tiny_phi3,
    tiny_qwen3,
)

# (family, model factory, RoPE mode); OPT/MPT have no RoPE, their mode argument is ignored.
CASES = [
    ("llama-gqa", lambda: tiny_llama(kv_heads=2), "pre"),
    ("llama-gqa", lambda: tiny_llama(kv_heads=2), "post"),
    ("llama-mha", lambda: tiny_llama(kv_heads=4), "pre"),
    ("opt", tiny_opt, "pre"),
    ("mpt", tiny_mpt, "pre"),
    # query/key norms: per head (Qwen3), across heads (OLMo-2)
    ("qwen3", tiny_qwen3, "pre"),
    ("qwen3", tiny_qwen3, "post"),
    ("olmo2", tiny_olmo2, "pre"),
    # sliding-window layers (the cache drops keys before the window: pre-RoPE positions count from the first
    # key held); Gemma-3 mixes them with global layers, each kind with its own RoPE
    ("mistral-sliding", tiny_mistral, "pre"),
    ("mistral-sliding", tiny_mistral, "post"),
    ("gemma3", tiny_gemma3, "pre"),
    ("gemma3", tiny_gemma3, "post"),
    ("gemma2-softcap", tiny_gemma2, "pre"),  # capped attention logits (the PyTorch path)
    ("gemma2-softcap", tiny_gemma2, "post"),
    # a fused qkv_proj (Phi-3), with RoPE on half of each head (post-RoPE only)
    ("phi3", tiny_phi3, "pre"),
    ("phi3-partial-rope", lambda: tiny_phi3(partial_rotary_factor=0.5), "post"),
    ("phi3-partial-rope", lambda: tiny_phi3(partial_rotary_factor=0.5), "pre"),
    # Pythia's architecture: query, key and value rows interleaved per head, RoPE on a quarter of each head
    ("gptneox", tiny_gptneox, "pre"),
    ("gptneox", tiny_gptneox, "post"),
    # RoPE scaling (Llama-3.1): the pre-RoPE rebuild takes the model's own rescaled frequencies
    ("llama3-rope-scaling", tiny_llama3_scaled, "pre"),
    ("yarn-rope-scaling", lambda: tiny_llama3_scaled(rope_type="yarn"), "pre"),
]
IDS = [f"{name}-{mode}" for name, _, mode in CASES]
# Every case with both basis kinds, plus the RoPE-averaged weighting where it applies (every pre-RoPE family).
BASIS_CASES = [(*case, basis) for case in CASES for basis in ("pca", "output")] + [
    (name, make, mode, "output-rope") for name, make, mode in CASES if mode == "pre" and name not in ("opt", "mpt")
]
BASIS_IDS = [f"{name}-{mode}-{basis}" for name, _, mode, basis in BASIS_CASES]


def compressed_with_logits(make, ratio, mode, basis="pca", allot="uniform"):
    """(plan, model before compression, logits before, logits after) of a fresh model compressed to ``ratio``."""
    model = make()
    original = copy.deepcopy(model)
    x = random_tokens(model)
    with torch.no_grad():
        before = model(x).logits
    config = EigenConfig(target_ratio=ratio, rope_mode=mode, basis=basis, allot=allot)
    plan = compress_model(model, random_windows(model), config, progress=False)
    assert is_compressed(model)
    with torch.no_grad():
        return plan, original, before, model(x).logits


@pytest.mark.parametrize(("name", "make", "mode", "basis"), BASIS_CASES, ids=BASIS_IDS)
def test_full_rank_equals_original(name, make, mode, basis):
    plan, _, before, after = compressed_with_logits(make, 1.0, mode, basis)
    assert plan.ratio == 1.0
    torch.testing.assert_close(after, before, atol=2e-5, rtol=1e-5)


@contextlib.contextmanager
def projected_by_hooks(model, plan):
    """``model`` (uncompressed) with each KV head's keys and values replaced by ``x E D^T`` through hooks
    on its activations: the reference that folding the bases into the weights must reproduce.

    Keys are projected where the plan's mode says (pre-RoPE: after ``k_proj``, or after ``k_norm`` when the
    model normalises keys; post-RoPE: after the rotation; no RoPE: after the key projection); queries are left
    alone (``(q D)(k E)^T = q (k E D^T)^T``).
    """
    import sys

    def projector(encoder, decoder):
        p = (encoder.double() @ decoder.double().transpose(-1, -2)).float()  # (heads or 1, d, d)
        return lambda x: torch.einsum("bthd,hde->bthe", x, p.expand(x.shape[2], -1, -1))

    def on_heads(fn, d, heads_first=False):
        def hook(module, args, out):
            if heads_first:  # (B, H, T, d): Gemma-3 normalises keys after moving heads first
                return fn(out.transpose(1, 2)).transpose(1, 2)
            return fn(out.view(*out.shape[:2], -1, d)).reshape(out.shape)

        return hook

    handles, current = [], {}
    modeling = sys.modules[type(attention_sites(model)[0].module).__module__]  # where the model's RoPE lives
    rope = getattr(modeling, "apply_rotary_pos_emb", None)  # (OPT, MPT: none)
    for site in attention_sites(model):
        kept, module = plan.kept(site.layer), site.module
        keys, values = projector(kept.key, kept.key_decoder), projector(kept.value, kept.value_decoder)
        d = kept.key.shape[1]
        if type(module).__name__ == "MptAttention":  # a fused Wqkv: queries, keys, values
            rows = torch.arange(module.Wqkv.out_features).chunk(3)
            fused_proj = module.Wqkv
        else:  # Phi-3's qkv_proj, GPT-NeoX's query_key_value (interleaved per head), or None
            fused_proj, rows = fused_rows(module) or (None, None)
        if fused_proj is not None:
            if plan.mode == "post":  # keys after the rotation, below
                handles.append(module.register_forward_pre_hook(lambda mod, args, keys=keys: current.update(keys=keys)))
            project_keys = keys if plan.mode != "post" else (lambda k: k)

            def fused(mod, args, out, keys=project_keys, values=values, d=d, rows=rows):
                out, shape = out.clone(), (*out.shape[:2], -1, d)
                for project, index in ((keys, rows[1]), (values, rows[2])):
                    out[..., index] = project(out[..., index].reshape(shape)).flatten(2)
                return out

            handles.append(fused_proj.register_forward_hook(fused))
            continue
        handles.append(module.v_proj.register_forward_hook(on_heads(values, d)))
        if plan.mode == "post":
            handles.append(module.register_forward_pre_hook(lambda mod, args, keys=keys: current.update(keys=keys)))
        else:
            key_output = getattr(module, "k_norm", None) or module.k_proj
            heads_first = key_output is not module.k_proj and type(module).__name__ == "Gemma3Attention"
            handles.append(key_output.register_forward_hook(on_heads(keys, d, heads_first)))

    def rotated_then_projected(q, k, cos, sin, *args, **kwargs):
        q, k = rope(q, k, cos, sin, *args, **kwargs)
        return q, current["keys"](k.transpose(1, 2)).transpose(1, 2)

    if plan.mode == "post":
        modeling.apply_rotary_pos_emb = rotated_then_projected
    try:
        yield model
    finally:
        modeling.apply_rotary_pos_emb = rope
        for handle in handles:
            handle.remove()


@pytest.mark.parametrize(("name", "make", "mode", "basis"), BASIS_CASES, ids=BASIS_IDS)
def test_reduced_rank_folding_equals_projecting_activations(name, make, mode, basis):
    plan, original, before, after = compressed_with_logits(make, 0.5, mode, basis)
    assert (after - before).abs().max() > 1e-3
    for kept in map(plan.kept, range(len(plan.ranks))):
        for encoder, decoder in ((kept.key, kept.key_decoder), (kept.value, kept.value_decoder)):
            eye = torch.eye(encoder.shape[-1]).expand(encoder.shape[0], -1, -1)
            torch.testing.assert_close(decoder.transpose(-1, -2) @ encoder, eye, atol=1e-4, rtol=0)
            if basis == "pca":  # orthonormal: the decoder is the encoder
                assert decoder is encoder
    with torch.no_grad(), projected_by_hooks(original, plan):
        reference = original(random_tokens(original)).logits
    torch.testing.assert_close(after, reference, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize(("name", "make", "mode"), CASES, ids=IDS)
def test_cached_decoding_equals_full_forward(name, make, mode):
    """The reference code rotates every cached key at the current position; here each key keeps its own."""
    model = make()
    compress_model(model, random_windows(model), EigenConfig(target_ratio=0.5, rope_mode=mode), progress=False)
    x = random_tokens(model, batch=2, length=24)
    with torch.no_grad():
        full = model(x).logits
        cache = DynamicCache(config=model.config)
        steps = [model(x[:, :8], past_key_values=cache, use_cache=True).logits]  # a prompt, then one token at a time
        for t in range(8, x.shape[1]):
            steps.append(model(x[:, t : t + 1], past_key_values=cache, use_cache=True).logits)
    torch.testing.assert_close(torch.cat(steps, dim=1), full, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("rope_type", ["dynamic", "longrope"])
def test_length_dependent_rope_rebuilds_each_step_as_one_forward_over_the_prefix(rope_type):
    """Dynamic-NTK and LongRoPE scaling change the frequencies with the length (past 16 positions here). The
    model's own cache keeps each key rotated with the frequencies of its step; the pre-RoPE rebuild rotates every
    key with the current ones, as one forward over the tokens so far does. One layer: deeper layers' cached
    inputs come from earlier steps in any cache, which one forward recomputes with the new frequencies."""

    def stepwise(model, x):
        cache = DynamicCache(config=model.config)
        steps = [model(x[:, :8], past_key_values=cache).logits[:, -1]]  # a prompt, then one token at a time
        steps += [model(x[:, t : t + 1], past_key_values=cache).logits[:, -1] for t in range(8, x.shape[1])]
        return torch.stack(steps, dim=1)

    def prefixes(model, x):  # shortest first: dynamic NTK's frequencies follow the longest length seen since
        return torch.stack([model(x[:, : t + 1]).logits[:, -1] for t in range(7, x.shape[1])], dim=1)

    model = tiny_llama3_scaled(rope_type=rope_type, layers=1).double()
    x = random_tokens(model, batch=2, length=24)
    with torch.no_grad():
        original = (stepwise(model, x) - prefixes(model, x)).abs().amax(dim=(0, 2))
        compress_model(model, random_windows(model), EigenConfig(target_ratio=0.5, rope_mode="pre"), progress=False)
        compressed, reference = stepwise(model, x), prefixes(model, x)
    assert original[:9].max() < 1e-12 < 1e-5 < original[9:].min()  # the model's own cache parts past 16 tokens
    torch.testing.assert_close(compressed, reference, atol=1e-12, rtol=0)


@pytest.mark.parametrize("mode", ["pre", "post"])
def test_generate_with_left_padding_matches_unpadded(mode):
    model = tiny_llama(kv_heads=2)
    compress_model(model, random_windows(model), EigenConfig(target_ratio=0.6, rope_mode=mode), progress=False)
    prompts = [random_tokens(model, 1, 12, seed=3)[0], random_tokens(model, 1, 7, seed=4)[0]]
    pad = model.config.pad_token_id
    batch = torch.full((2, 12), pad)
    mask = torch.zeros(2, 12, dtype=torch.long)
    for i, p in enumerate(prompts):
        batch[i, -len(p) :], mask[i, -len(p) :] = p, 1
    kwargs = {"max_new_tokens": 6, "do_sample": False, "pad_token_id": pad}
    together = model.generate(batch, attention_mask=mask, **kwargs)[:, 12:]
    for i, p in enumerate(prompts):
        alone = model.generate(p[None], attention_mask=torch.ones(1, len(p), dtype=torch.long), **kwargs)
        assert together[i].tolist() == alone[0, len(p) :].tolist()


@pytest.mark.parametrize("ratio", [0.3, 0.6, 0.8])
@pytest.mark.parametrize(
    ("allot", "basis", "mode"),
    [("budget", "pca", "pre"), ("uniform", "pca", "pre"), ("fisher", "output", "pre"), ("fisher", "output", "post")],
)
def test_target_ratio_is_met_and_cache_bytes_match_accounting(ratio, allot, basis, mode):
    model = tiny_llama(kv_heads=2, hidden_size=256)  # head size 64: one component is 1/256 of the cache
    config = EigenConfig(target_ratio=ratio, allot=allot, basis=basis, rope_mode=mode)
    plan = compress_model(model, random_windows(model), config, progress=False)
    assert abs(plan.ratio - ratio) <= 0.005
    if allot == "uniform":
        flat = [r for pair in plan.ranks for r in pair]  # one rank; a few components more or less to meet the ratio
        assert sum(r == round(ratio * 64) for r in flat) >= len(flat) - 2
    x = random_tokens(model, batch=3, length=37)
    cache = DynamicCache(config=model.config)
    with torch.no_grad():
        model(x, past_key_values=cache, use_cache=True)
    counted = kv_cache_bytes(model, seq_len=37, batch_size=3, dtype=torch.float32)
    assert cache_held_bytes(cache) == counted.total - counted.components["bases"]
    modules = [m for m in model.modules() if isinstance(m, EigenAttention)]
    kept = [m.key_basis for m in modules] + [m.query_basis for m in modules if m.query_basis is not None]
    assert counted.components["bases"] == sum(b.numel() * 4 for b in kept)
    assert len(kept) == (2 if (basis, mode) == ("output", "post") else 1) * len(modules)
    dense = kv_cache_bytes(tiny_llama(kv_heads=2, hidden_size=256), seq_len=37, batch_size=3, dtype=torch.float32)
    per_token = counted.total - counted.components["bases"]
    assert per_token / dense.total == pytest.approx(plan.ratio)


def test_budget_allotment_gives_values_more_components_when_their_spectrum_is_flatter():
    model = tiny_llama(kv_heads=2, hidden_size=256)
    with torch.no_grad():  # make keys low rank: only 8 input directions reach them
        model.model.layers[0].self_attn.k_proj.weight[:, 8:] *= 0.01
    config = EigenConfig.method("paper", target_ratio=0.5, allot="budget")
    plan = compress_model(model, random_windows(model), config, progress=False)
    assert plan.ranks[0][0] < plan.ranks[0][1]


def test_fisher_allotment_starves_a_layer_whose_output_does_not_matter():
    model = tiny_llama(kv_heads=2, hidden_size=128)
    with torch.no_grad():  # layer 1's attention barely reaches the residual stream
        model.model.layers[1].self_attn.o_proj.weight *= 1e-3
    plan = compress_model(model, random_windows(model), EigenConfig(target_ratio=0.5), progress=False)
    (k0, v0), (k1, v1) = plan.ranks
    assert k1 + v1 < k0 + v0 and abs(plan.ratio - 0.5) <= 0.005
    predicted = plan.extra["predicted_loss"]
    assert plan.extra["predicted_nll_increase"] == pytest.approx(sum(map(sum, predicted)))
    curves = plan.extra["sensitivity"]
    for curve in curves["keys"] + curves["values"]:  # index = rank: non-increasing, nothing lost at full rank
        assert all(a >= b for a, b in zip(curve, curve[1:], strict=False)) and curve[-1] == 0.0
    assert curves["values"][1][16] < 1e-3 * curves["values"][0][16]


def test_output_basis_minimises_the_error_weighted_by_its_reader():
    from eigenkv.compress.basis import layer_bases
    from eigenkv.compress.calibrate import LayerStats

    gen = torch.Generator().manual_seed(0)
    d = 12
    x = torch.randn(400, d, generator=gen, dtype=torch.float64) * torch.logspace(0, -1, d, dtype=torch.float64)
    reader = torch.randn(d, 30, generator=gen, dtype=torch.float64)
    gram, weight = (x.T @ x)[None], (reader @ reader.T)[None]
    stats = LayerStats(queries=weight, keys=gram, values=gram, tokens=400)
    output = layer_bases(stats, "none", "output", value_weight=weight)
    pca = layer_bases(stats, "none", "pca")

    def weighted_error(encoder, decoder, r):
        residual = x - x @ encoder[0, :, :r] @ decoder[0, :, :r].T
        return float(((residual @ weight[0]) * residual).sum())

    scale = float(weight[0].diagonal().mean())  # eigenvalues are those of M / its mean eigenvalue
    for r in (2, 6, 10):
        best = weighted_error(output.values, output.value_duals, r)
        assert best == pytest.approx(scale * float(output.value_eigenvalues[0, r:].sum()), rel=1e-9)
        assert best < 0.9 * weighted_error(pca.values, pca.values, r)
    torch.testing.assert_close(output.values[0] @ output.value_duals[0].T, torch.eye(d, dtype=torch.float64))
    # A Gram summed over 10^6 times more tokens gives the same pair: cached coefficients keep their size.
    louder = layer_bases(stats, "none", "output", value_weight=weight * 1e6)
    torch.testing.assert_close(louder.values, output.values)
    torch.testing.assert_close(louder.value_duals, output.value_duals)
    # Unit-norm encoder columns: a cached coefficient is never larger than the vector it encodes.
    torch.testing.assert_close(output.values.norm(dim=-2), torch.ones(1, d, dtype=torch.float64))
    assert (x @ output.values[0]).abs().max() <= x.norm(dim=-1).max()


def test_each_layer_gets_its_kinds_rope():
    """Gemma-3's local and global RoPEs: transformers 5 keeps both in one module (per-type buffers, called with the
    layer type), transformers 4 in two (``rotary_emb_local`` for the sliding layers); one RoPE serves every layer
    otherwise; a model without one is refused. The local RoPE has a smaller base: faster angles."""
    import types

    from eigenkv.compress.families import layer_rope

    model = tiny_gemma3()  # sliding, global, sliding
    ropes = [layer_rope(model, layer) for layer in range(3)]
    assert [r.layer_type for r in ropes] == ["sliding_attention", "full_attention", "sliding_attention"]
    local, full = ropes[0].inv_freq, ropes[1].inv_freq
    assert local.shape == full.shape and (local[1:] > full[1:]).all()
    cos, _ = ropes[0](torch.zeros(1), torch.arange(5)[None])
    torch.testing.assert_close(cos[0, :, : local.numel()], torch.cos(torch.arange(5.0)[:, None] * local))

    class Rotary(torch.nn.Module):  # transformers 4's layout: a module per RoPE, each with its inv_freq
        def __init__(self, base):
            super().__init__()
            self.register_buffer("inv_freq", 1.0 / base ** (torch.arange(0, 16, 2) / 16))

    older = torch.nn.Module()
    older.config = types.SimpleNamespace(layer_types=["sliding_attention", "full_attention"])
    older.rotary_emb, older.rotary_emb_local = Rotary(1e6), Rotary(1e4)
    assert layer_rope(older, 0).module is older.rotary_emb_local and layer_rope(older, 1).module is older.rotary_emb
    plain = tiny_llama()
    assert layer_rope(plain, 1).module is plain.model.rotary_emb and layer_rope(plain, 1).layer_type is None
    with pytest.raises(ValueError, match="no rotary_emb module"):
        layer_rope(tiny_opt(), 0)


def test_rope_averaged_query_weight_keeps_its_trace_and_symmetry():
    from eigenkv.compress.basis import rope_averaged
    from eigenkv.compress.families import layer_rope, rope_rotations

    model = tiny_llama(kv_heads=2)
    rotations, counts = rope_rotations(layer_rope(model, 0), 40, 16)
    torch.testing.assert_close(rotations[0], torch.eye(16, dtype=torch.float64))
    torch.testing.assert_close(
        rotations @ rotations.transpose(-1, -2), torch.eye(16, dtype=torch.float64).expand(40, -1, -1)
    )
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(2, 16, 16, generator=gen, dtype=torch.float64)
    weight = a @ a.transpose(-1, -2)
    averaged = rope_averaged(weight, rotations, counts)
    torch.testing.assert_close(averaged, averaged.transpose(-1, -2))
    torch.testing.assert_close(averaged.diagonal(dim1=-2, dim2=-1).sum(-1), weight.diagonal(dim1=-2, dim2=-1).sum(-1))
    assert (averaged - weight).abs().max() > 1e-3 * weight.abs().max()


def test_error_budget_rule_keeps_every_layer_within_its_budget():
    model = tiny_llama(kv_heads=2, hidden_size=128)
    windows = random_windows(model)
    tight = compress_model(
        tiny_llama(kv_heads=2, hidden_size=128),
        windows,
        EigenConfig(target_ratio=None, error_budget=0.05),
        progress=False,
    )
    loose = compress_model(model, windows, EigenConfig(target_ratio=None, error_budget=0.3), progress=False)
    assert all(e <= 0.05 for e in tight.errors) and all(e <= 0.3 for e in loose.errors)
    assert all(lk <= tk and lv <= tv for (lk, lv), (tk, tv) in zip(loose.ranks, tight.ranks, strict=True))
    assert loose.ratio < tight.ratio < 1


def test_plan_round_trip_and_refusals(tmp_path):
    model = tiny_llama(kv_heads=2)
    windows = random_windows(model)
    plan = compress_model(model, windows, EigenConfig(target_ratio=0.5, rope_mode="post"), progress=False)
    path = plan.save(tmp_path / "plan")
    meta = json.loads((path / "plan.json").read_text())
    assert meta["config"]["rope_mode"] == "post" and meta["ranks"] == [list(r) for r in plan.ranks]
    assert meta["calibration"]["source"] == "random" and meta["calibration"]["tokens"] == 4 * 48
    with pytest.raises(FileExistsError, match="exists"):
        plan.save(tmp_path / "plan")

    fresh = tiny_llama(kv_heads=2)
    loaded = EigenPlan.load(path)
    apply_plan(fresh, loaded)
    assert loaded.ranks == plan.ranks and loaded.mode == "post"
    x = random_tokens(model)
    with torch.no_grad():
        torch.testing.assert_close(fresh(x).logits, model(x).logits, atol=1e-5, rtol=1e-5)

    with pytest.raises(ValueError, match="other attention weights"):
        apply_plan(tiny_llama(kv_heads=2, seed=7), loaded)  # same shapes, other weights
    with pytest.raises(ValueError, match="another model"):
        apply_plan(tiny_llama(kv_heads=4), loaded)
    with pytest.raises(ValueError, match="already compressed"):
        apply_plan(fresh, loaded)

    corrupt = tmp_path / "corrupt"
    plan.save(corrupt)
    data = (corrupt / "bases.safetensors").read_bytes()
    (corrupt / "bases.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="corrupt"):
        EigenPlan.load(corrupt)
    with pytest.raises(FileNotFoundError, match="not a compression plan"):
        EigenPlan.load(tmp_path)

    from safetensors.torch import load_file, save_file

    assert meta["method"] == "eigenkv" and meta["config"]["basis"] == "output"
    skewed = tmp_path / "skewed"
    plan.save(skewed)
    tensors = load_file(skewed / "bases.safetensors")
    tensors["layers.1.value_dual"] = tensors["layers.1.value_dual"] * 1.1
    save_file(tensors, skewed / "bases.safetensors", metadata={"format": "eigenkv-plan/3"})
    with pytest.raises(ValueError, match="modified after the plan was saved"):
        EigenPlan.load(skewed)  # an edited bases file is refused by its digest
    # ... and one whose digest was updated too is still refused by the consistency checks
    from eigenkv.io import seal, sha256_file

    resealed = {
        **json.loads((skewed / "plan.json").read_text()),
        "bases_sha256": sha256_file(skewed / "bases.safetensors"),
    }
    (skewed / "plan.json").write_text(json.dumps(seal(resealed)))
    with pytest.raises(ValueError, match="not biorthogonal"):
        EigenPlan.load(skewed)

    # Any edit of plan.json is refused; so are plans of older formats (their digests cannot be checked).
    edited = tmp_path / "edited"
    plan.save(edited)
    meta = json.loads((edited / "plan.json").read_text())
    meta["errors"][0] = 0.0
    (edited / "plan.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="edited after it was written"):
        EigenPlan.load(edited)
    meta["format"] = "eigenkv-plan/2"
    (edited / "plan.json").write_text(json.dumps(seal(meta)))
    with pytest.raises(ValueError, match="recompute the plan"):
        EigenPlan.load(edited)
    assert oct((edited / "plan.json").stat().st_mode & 0o777) != oct(0o600)  # readable by other users


def test_bad_input_raises_clear_errors():
    for bad in (0.0, -0.1, 1.5):
        with pytest.raises(ValueError, match="target_ratio"):
            EigenConfig(target_ratio=bad)
    with pytest.raises(ValueError, match="exactly one"):
        EigenConfig(target_ratio=0.6, error_budget=0.1)
    with pytest.raises(ValueError, match="allot"):
        EigenConfig(allot="greedy")
    with pytest.raises(ValueError, match="rope_mode"):
        EigenConfig(rope_mode="mid")
    with pytest.raises(ValueError, match="basis must be one of"):
        EigenConfig(basis="svd")
    with pytest.raises(ValueError, match="method must be one of"):
        EigenConfig.method("best")
    with pytest.raises(ValueError, match="output-rope"):
        EigenConfig(basis="output-rope", rope_mode="post")
    with pytest.raises(ValueError, match="output-rope"):
        compress_model(tiny_opt(), random_windows(tiny_opt()), EigenConfig(basis="output-rope"), progress=False)
    singular = tiny_llama()
    with torch.no_grad():  # query heads 0-1 write nothing: KV head 0's output-projection Gram is zero
        singular.model.layers[0].self_attn.o_proj.weight[:, :32] = 0
    with pytest.raises(ValueError, match="output-projection Gram is singular"):
        compress_model(singular, random_windows(singular), progress=False)
    pca = compress_model(singular, random_windows(singular), EigenConfig.method("paper"), progress=False)
    assert pca.config.method_name == "paper"

    model = tiny_llama()
    empty = TokenWindows(torch.empty(0, 16, dtype=torch.long), "random", 16, "none", 0, 0)
    with pytest.raises(ValueError, match="at least one window"):
        compress_model(model, empty, progress=False)
    with torch.no_grad():
        model.model.layers[1].self_attn.v_proj.weight[0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        compress_model(model, random_windows(model), progress=False)

    from transformers import GPT2Config, GPT2LMHeadModel

    gpt2 = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=50)).eval()
    with pytest.raises(ValueError, match="unsupported model GPT2LMHeadModel"):
        compress_model(gpt2, random_windows(gpt2), progress=False)
    with pytest.raises(ValueError, match="below what this model can keep"):
        compress_model(
            tiny_llama(), random_windows(tiny_llama()), EigenConfig(target_ratio=0.01, min_rank=2), progress=False
        )


def test_one_calibration_serves_several_configs():
    from eigenkv.compress.calibrate import calibrate

    model = tiny_llama(kv_heads=2, hidden_size=128)
    windows = random_windows(model)
    stats = calibrate(model, windows, rotated=False, gradients=True, progress=False)
    reused = compress_model(
        tiny_llama(kv_heads=2, hidden_size=128), stats, EigenConfig(target_ratio=0.5), progress=False
    )
    direct = compress_model(model, windows, EigenConfig(target_ratio=0.5), progress=False)
    assert reused.ranks == direct.ranks and reused.calibration["source"] == "random"
    ((curves, _),) = stats.derived.values()  # measured once, then shared by every ratio
    other = compress_model(
        tiny_llama(kv_heads=2, hidden_size=128), stats, EigenConfig(target_ratio=0.7), progress=False
    )
    assert other.extra["sensitivity"]["keys"] == [k for k, _ in curves] and other.ratio > reused.ratio
    for a, b in zip(reused.key_bases + reused.value_bases, direct.key_bases + direct.value_bases, strict=True):
        torch.testing.assert_close(a.abs(), b.abs())
    with pytest.raises(ValueError, match="pre-RoPE statistics"):
        compress_model(tiny_llama(kv_heads=2, hidden_size=128), stats, EigenConfig(rope_mode="post"), progress=False)
    with pytest.raises(ValueError, match="another model"):
        compress_model(tiny_llama(kv_heads=2, hidden_size=128, seed=5), stats, progress=False)
    without_gradients = calibrate(tiny_llama(kv_heads=2, hidden_size=128), windows, progress=False)
    with pytest.raises(ValueError, match="needs loss gradients"):
        compress_model(tiny_llama(kv_heads=2, hidden_size=128), without_gradients, progress=False)
    paper = EigenConfig.method("paper", target_ratio=0.5)  # PCA bases need no gradients
    assert compress_model(tiny_llama(kv_heads=2, hidden_size=128), without_gradients, paper, progress=False).ranks


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("mode", ["pre", "post"])
def test_full_rank_in_half_precision_is_within_rounding(dtype, mode):
    model = tiny_llama(kv_heads=2).to(dtype)
    x = random_tokens(model)
    with torch.no_grad():
        before = model(x).logits.float()
    compress_model(model, random_windows(model), EigenConfig(target_ratio=1.0, rope_mode=mode), progress=False)
    assert all(m.key_basis.dtype == dtype for m in model.modules() if isinstance(m, EigenAttention))
    with torch.no_grad():
        after = model(x).logits.float()
    eps = torch.finfo(dtype).eps
    assert (after - before).abs().max() <= 4 * eps * before.abs().max()
