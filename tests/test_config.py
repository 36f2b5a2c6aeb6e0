import pytest

from toolkit.config import TrainConfig, load_config
from toolkit.errors import UserError


def test_recipe_plus_overrides_give_typed_config():
    config = load_config(["recipe=digits", "max_steps=7", "lr=0.01", "beta=0.9", "data.shards=/x/y", "model.latent_dim=32"])
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
    config = load_config(["recipe=digits", "model.arch=resnet", "model.prior=learned", "model.width=32", "model.levels=3",
                          "model.embed_dim=64"])
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


@pytest.mark.parametrize("name, shards", [
    ("digits", "digits"), ("celeba", "celeba"), ("celeba64", "celeba64"), ("cub", "cub"),
    ("celeba-laptop", "celeba64"),  # the same 64x64 shards as celeba64
    ("cub-species", "cub-species64"),
])
def test_every_shipped_recipe_loads(name, shards):
    from toolkit.config import available_recipes

    assert name in available_recipes()
    config = load_config([f"recipe={name}"])
    assert config.recipe == name and config.data.shards == f"shards/{shards}"


def test_text_keys_take_the_text_as_typed():
    # YAML reads a bare `no` as false; mixed_precision=no must stay the string "no"
    config = load_config(["recipe=digits", "mixed_precision=no", "run_dir=runs/007", "data.shards=pipe:cat x"])
    assert (config.mixed_precision, config.run_dir, config.data.shards) == ("no", "runs/007", "pipe:cat x")
