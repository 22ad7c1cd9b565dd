"""Recipe: validation, round trips (dict and disk), version checks."""

from __future__ import annotations

import json

import pytest

from eigenkv import ComponentQuantConfig, EigenConfig, KVQuantConfig, LayerwiseKVQuantConfig, Recipe

FULL = Recipe(
    lowrank=EigenConfig.method("paper", target_ratio=0.7, rope_mode="post"),
    components=ComponentQuantConfig(scale=True),
    kv=KVQuantConfig(bits=3, group_size=32, residual=16),
    kv_layers={1: KVQuantConfig(bits=8, group_size=64)},
    weights="nf4",
)


def test_round_trip_through_dict_json_and_disk(tmp_path):
    assert Recipe.from_dict(FULL.to_dict()) == FULL
    assert Recipe.from_dict(json.loads(json.dumps(FULL.to_dict()))) == FULL
    assert Recipe.load(FULL.save(tmp_path / "recipe.json")) == FULL
    assert Recipe.from_dict(Recipe().to_dict()) == Recipe()
    assert Recipe().label() == "fp16"
    assert FULL.label() == "eigen0.7-post-uniform+scale+3b-g32-kc-vt-r16+layers+w-nf4"


def test_cache_config_per_layer():
    config = FULL.cache_config(3)
    assert isinstance(config, LayerwiseKVQuantConfig)
    assert config == LayerwiseKVQuantConfig.per_layer([FULL.kv, KVQuantConfig(bits=8, group_size=64), FULL.kv])
    assert Recipe(kv=KVQuantConfig()).cache_config(5) == KVQuantConfig()
    assert Recipe().cache_config(5) is None
    with pytest.raises(ValueError, match="names layer 1; this model has 1 layers"):
        FULL.cache_config(1)


@pytest.mark.parametrize(
    "change, message",
    [
        ({"format": "something"}, "not an eigenkv recipe"),
        ({"version": 2}, "recipe version 2 is not supported"),
        ({"colour": "red"}, "unknown recipe fields"),
        ({"kv": {"bits": 4.0}}, "bits must be an integer"),
        ({"kv": {"bits": 4, "group_size": True}}, "group_size must be an integer"),
        ({"kv": {"bits": 5}}, "bits=5 is not supported"),
        ({"lowrank": {"target_ratio": "0.6"}}, "target_ratio must be a finite number"),
        ({"lowrank": {"target_ratio": 0.6, "min_rank": 1.5}}, "min_rank must be an integer"),
        ({"lowrank": {"target_ratio": 0.6, "colour": 1}}, "unknown EigenConfig fields"),
        ({"weights": "int4"}, "Recipe.weights must be one of"),
        ({"kv_layers": {"x": {"bits": 4}}}, "layer numbers are non-negative integers"),
        ({"kv_layers": [1]}, "kv_layers must be an object"),
        ({"components": {"scale": True}}, "set lowrank and kv"),
        ({"components": {"scale": 1}, "lowrank": {"target_ratio": 0.6}, "kv": {}}, "scale must be true or false"),
    ],
)
def test_bad_recipes_are_refused_with_the_field_named(change, message):
    data = {**Recipe().to_dict(), **change}
    with pytest.raises(ValueError, match=message):
        Recipe.from_dict(data)


def test_bad_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="no recipe file"):
        Recipe.load(tmp_path / "missing.json")
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(ValueError, match="is not JSON"):
        Recipe.load(tmp_path / "bad.json")
    with pytest.raises(ValueError, match="Recipe.kv must be a KVQuantConfig"):
        Recipe(kv={"bits": 4})
    with pytest.raises(ValueError, match="set kv for the others"):
        Recipe(kv_layers={0: KVQuantConfig()})


def test_overrides_per_kind_round_trip_and_build_the_cache_config(tmp_path):
    eight, two = KVQuantConfig(bits=8, group_size=32), KVQuantConfig(bits=2, group_size=128, axis_v="channel")
    recipe = Recipe(kv=KVQuantConfig(bits=4), kv_layers={0: (eight, None), 2: (None, two), 3: [two, two]})
    assert recipe.kv_layers == ((0, (eight, None)), (2, (None, two)), (3, two))  # a pair of one config: that config
    data = json.loads(json.dumps(recipe.to_dict()))
    assert data["kv_layers"] == {
        "0": {"keys": eight.to_dict(), "values": None},
        "2": {"keys": None, "values": two.to_dict()},
        "3": two.to_dict(),
    }
    assert Recipe.from_dict(data) == recipe
    assert Recipe.load(recipe.save(tmp_path / "recipe.json")) == recipe
    assert recipe.label() == "4b-g64-kc-vt-r0+layers"
    four = KVQuantConfig(bits=4)
    assert recipe.cache_config(5) == LayerwiseKVQuantConfig(
        (eight, four, None, two, four), (None, four, two, two, four)
    )
    # files written before overrides per kind read as they did
    old = {**Recipe().to_dict(), "kv": four.to_dict(), "kv_layers": {"1": eight.to_dict()}}
    assert Recipe.from_dict(old) == Recipe(kv=four, kv_layers={1: eight})
    assert Recipe.from_dict(old).cache_config(3) == LayerwiseKVQuantConfig.per_layer([four, eight, four])
    with pytest.raises(ValueError, match="every stream is unquantized"):
        Recipe(kv=four, kv_layers={0: (None, None)}).cache_config(1)


@pytest.mark.parametrize(
    "override, message",
    [
        ({"keys": {"bits": 4}}, r"needs exactly the fields keys and values .* got \['keys'\]"),
        ({"keys": None, "values": None, "colour": 1}, "needs exactly the fields keys and values"),
        ({"keys": 4, "values": None}, "a KVQuantConfig is a JSON object"),
        ({"keys": {"bits": 5}, "values": None}, "bits=5 is not supported"),
        ([{"bits": 4}, None], "must be a KVQuantConfig object or {keys, values}"),
        ({"nbits": 4}, "unknown KVQuantConfig fields"),
    ],
)
def test_bad_overrides_per_kind_are_refused(override, message):
    data = {**Recipe().to_dict(), "kv": {}, "kv_layers": {"1": override}}
    with pytest.raises(ValueError, match=message):
        Recipe.from_dict(data)


def test_bad_override_objects_are_refused():
    for bad in ((KVQuantConfig(),), (KVQuantConfig(), None, None), ({"bits": 4}, None), "4b"):
        with pytest.raises(ValueError, match=r"kv_layers\[0\] must be a KVQuantConfig .* or a pair"):
            Recipe(kv=KVQuantConfig(), kv_layers={0: bad})
