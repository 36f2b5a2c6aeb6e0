import os

import pytest

from toolkit.config import TrainConfig, load_config
from toolkit.errors import UserError


def test_recipe_plus_overrides_give_typed_config():
    config = load_config(
        ["recipe=digits", "max_steps=7", "lr=0.01", "beta=0.9", "data.shards=/x/y", "model.latent_dim=32"]
    )
    assert isinstance(config, TrainConfig)
    assert (config.max_steps, config.lr, config.beta) == (7, 0.01, 0.9)
    assert isinstance(config.max_steps, int) and isinstance(config.lr, float)
    assert config.data.shards == "/x/y" and config.model.latent_dim == 32
    assert config.recipe == "digits" and config.run_dir == "runs/digits"
    assert config.model.arch == "paper" and config.mixed_precision == "auto"


def test_recipe_by_path(tmp_path):
    path = tmp_path / "mine.yaml"
    path.write_text("max_steps: 3\ndata:\n  shards: here\n")
    config = load_config([f"recipe={path}"])
    assert (config.max_steps, config.data.shards, config.recipe, config.run_dir) == (3, "here", "mine", "runs/mine")


@pytest.mark.parametrize(
    "args, words",
    [
        (["recipe=nope"], ["nope", "digits"]),
        (["recipe=digits", "data.shardz=x"], ["data.shardz", "data.shards"]),
        (["recipe=digits", "max_stepz=3"], ["max_stepz", "max_steps"]),
        (["recipe=digits", "max_steps=many"], ["max_steps", "int"]),
        (["recipe=digits", "beta=2"], ["beta", "[0, 1]"]),
        (["recipe=digits", "mixed_precision=fp8"], ["mixed_precision", "bf16"]),
        (["recipe=digits", "model.arch=vit"], ["model.arch", "paper"]),
        (["recipe=digits", "max_steps"], ["key=value", "max_steps"]),
        ([], ["recipe=NAME"]),
    ],
)
def test_bad_config_names_the_key(args, words):
    with pytest.raises(UserError) as caught:
        load_config(args)
    for word in words:
        assert word in str(caught.value)


def test_unknown_key_in_recipe_file(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("max_steps: 3\nbatchsize: 4\n")
    with pytest.raises(UserError, match="batchsize"):
        load_config([f"recipe={path}"])


def test_model_keys():
    config = load_config(
        [
            "recipe=digits",
            "model.arch=resnet",
            "model.prior=learned",
            "model.width=32",
            "model.levels=3",
            "model.embed_dim=64",
        ]
    )
    assert (config.model.arch, config.model.prior) == ("resnet", "learned")
    assert (config.model.width, config.model.levels, config.model.embed_dim) == (32, 3, 64)
    default = load_config(["recipe=digits"]).model
    assert (default.prior, default.width, default.levels, default.embed_dim) == ("standard", 64, 4, 128)


@pytest.mark.parametrize(
    "arg, words",
    [
        ("model.prior=flow", ["model.prior", "standard | learned"]),
        ("model.arch=vit", ["model.arch", "paper | resnet"]),
        ("model.width=0", ["model.width", "positive"]),
        ("model.levels=-1", ["model.levels", "positive"]),
        ("model.embed_dim=0", ["model.embed_dim", "positive"]),
    ],
)
def test_bad_model_values_name_the_key(arg, words):
    with pytest.raises(UserError) as caught:
        load_config(["recipe=digits", arg])
    for word in words:
        assert word in str(caught.value)


@pytest.mark.parametrize(
    "name, shards",
    [
        ("digits", "digits"),
        ("celeba", "celeba"),
        ("celeba64", "celeba64"),
        ("cub", "cub"),
        ("celeba-laptop", "celeba64"),  # the same 64x64 shards as celeba64
        ("cub-species", "cub-species64"),
    ],
)
def test_every_shipped_recipe_loads(name, shards):
    from toolkit.config import available_recipes

    assert name in available_recipes()
    config = load_config([f"recipe={name}"])
    assert config.recipe == name and config.data.shards == f"shards/{shards}"


def test_text_keys_take_the_text_as_typed():
    # YAML reads a bare `no` as false; mixed_precision=no must stay the string "no"
    config = load_config(["recipe=digits", "mixed_precision=no", "run_dir=runs/007", "data.shards=pipe:cat x"])
    assert (config.mixed_precision, config.run_dir, config.data.shards) == ("no", "runs/007", "pipe:cat x")


@pytest.mark.parametrize(
    "text, words",
    [
        ("- a\n- b\n", ["is a YAML list, not a mapping"]),
        ("42\n", ["is a YAML int, not a mapping"]),
        ("just text\n", ["is a YAML str, not a mapping"]),
        ("", ["is empty"]),
        ("# only a comment\n", ["is empty"]),
        ("{{{ not: [", ["is not valid YAML"]),
        (b"\x00\xff\xfe", ["is not valid YAML", "utf-8"]),
        ("max_steps: 5\nmax_steps: 6\n", ["is not valid YAML", "max_steps"]),
    ],
)
def test_a_recipe_that_is_not_a_mapping_of_keys_is_one_user_error(tmp_path, text, words):
    path = tmp_path / "recipe.yaml"
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    with pytest.raises(UserError) as caught:
        load_config([f"recipe={path}"])
    message = str(caught.value)
    assert str(path) in message and "\n" not in message
    for word in words:
        assert word in message


@pytest.mark.parametrize(
    "args, key",
    [
        (["model.levels=7"], "model.levels"),
        (["model.width=32"], "model.width"),
        (["model.embed_dim=16"], "model.embed_dim"),
    ],
)
def test_a_model_option_the_arch_ignores_is_refused(tmp_path, args, key):
    with pytest.raises(
        UserError, match=f"config key '{key}' \\(on the command line\\) does nothing with model.arch=paper"
    ):
        load_config(["recipe=digits", *args])
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"model:\n  arch: paper\n  {key.split('.')[1]}: {args[0].split('=')[1]}\n")
    with pytest.raises(UserError, match=f"'{key}' \\(in recipe {recipe}\\) does nothing"):
        load_config([f"recipe={recipe}"])
    assert load_config(["recipe=digits", "model.arch=resnet", *args]).model.arch == "resnet"


def test_a_saved_recipe_yaml_loads_again_and_arch_keys_match_the_model(tmp_path):
    from toolkit.config import ARCH_KEYS, to_yaml

    assert ARCH_KEYS == {"paper": (), "resnet": ("width", "levels", "embed_dim")}
    saved = tmp_path / "recipe.yaml"  # lists every key, the resnet options at their defaults too
    saved.write_text(to_yaml(load_config(["recipe=digits"])))
    assert load_config([f"recipe={saved}"]).model.arch == "paper"


@pytest.mark.parametrize("override", ["run_dir=", "data.shards=", "max_steps=", "mixed_precision= "])
def test_an_empty_override_is_refused_not_taken_as_a_default(override):
    """`run_dir=$UNSET` would otherwise resume or overwrite runs/<recipe>; `data.shards=` read the current folder."""
    with pytest.raises(UserError, match=f"bad override '{override}': the value is empty"):
        load_config(["recipe=digits", override])


def test_an_empty_resume_means_start_afresh():
    assert load_config(["recipe=digits", "resume="]).resume == ""


@pytest.mark.parametrize("key", ["run_dir", "data.shards", "resume"])
def test_a_path_that_is_not_utf8_text_is_refused_before_the_run_records_it(key):
    value = os.fsdecode(b"runs/caf\xe9")  # Latin-1 bytes in a Linux file name
    with pytest.raises(UserError, match=rf"config key '{key}': expected UTF-8 text, got 'runs/caf\\xe9'"):
        load_config(["recipe=digits", f"{key}={value}"])
