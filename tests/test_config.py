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
def test_every_shipped_recipe_loads(monkeypatch, name, shards):
    import toolkit.config
    from toolkit.config import available_recipes

    monkeypatch.setattr(toolkit.config, "usable_cpus", lambda: 1)  # its data.num_workers, on a one-CPU machine too
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


# --- odd recipe files and command lines (RELIABILITY.md section 5) ------------------------------


@pytest.mark.parametrize(
    "text, words",
    [
        ("max_steps: ${max_steps}\n", ["config key 'max_steps'", "Recursive interpolation"]),
        ("max_steps: ${batch_size}\nbatch_size: ${max_steps}\n", ["Recursive interpolation"]),
        ("max_steps: ${nope}\n", ["config key 'max_steps'", "'nope' not found"]),
        ("run_dir: ${oc.env:CVAE_TK_NO_SUCH_VARIABLE}\n", ["config key 'run_dir'", "CVAE_TK_NO_SUCH_VARIABLE"]),
        ("data:\n  shards: ${data.shards}\n", ["config key 'data.shards'", "Recursive"]),
        (None, ["is a folder", "expected a YAML file"]),  # recipe=<a folder named like a recipe>
    ],
)
def test_a_recipe_file_whose_values_cannot_be_read_is_one_line(tmp_path, text, words):
    # interpolations were read while listing the recipe's keys, outside any check: a traceback
    path = tmp_path / "odd.yaml"
    path.mkdir() if text is None else path.write_text(text)
    with pytest.raises(UserError) as caught:
        load_config([f"recipe={path}"])
    assert "\n" not in str(caught.value)
    for word in words:
        assert word in str(caught.value)


@pytest.mark.parametrize(
    "text, key, value",
    [
        ("mixed_precision: no\n", "mixed_precision", "no"),  # YAML: false (refused as not auto | no | ...)
        ("run_dir: 2024_01\n", "run_dir", "2024_01"),  # YAML: the number 202401
        ("data:\n  shards: 0x10\n", "data.shards", "0x10"),  # YAML: 16
        ("resume: 1e3\n", "resume", "1e3"),  # OmegaConf: 1000.0
        ("run_dir: 'quoted'\n", "run_dir", "quoted"),
        ("<<: {run_dir: 007, max_steps: 5}\n", "run_dir", "007"),  # a merge key
        ("<<: [{run_dir: 007}, {run_dir: 008}]\n", "run_dir", "007"),  # the first source wins
        ("<<: {run_dir: 007}\nrun_dir: 009\n", "run_dir", "009"),  # the key written beside it wins
        ("data: {shards: &s 0x10}\nrun_dir: *s\n", "run_dir", "0x10"),  # an alias
    ],
)
def test_a_text_key_of_a_recipe_file_takes_the_text_as_written(tmp_path, text, key, value):
    # as the command line does (test_text_keys_take_the_text_as_typed); values of other types stay YAML's
    path = tmp_path / "recipe.yaml"
    path.write_text(text)
    config = load_config([f"recipe={path}"])
    section, _, name = key.rpartition(".")
    assert getattr(getattr(config, section) if section else config, name) == value
    assert load_config([f"recipe={path}", "max_steps=0x10"]).max_steps == 16  # an int key: YAML's reading


def test_paths_starting_with_a_tilde_are_the_home_folders(tmp_path, monkeypatch):
    # sh, zsh and bash --posix leave `run_dir=~/x` as it is: a folder named '~' was made in the current one
    monkeypatch.setenv("HOME", str(tmp_path))
    config = load_config(["recipe=digits", "run_dir=~/runs/a", "data.shards=~/shards", "resume=~/ck/checkpoint-2"])
    assert (config.run_dir, config.data.shards, config.resume) == (
        f"{tmp_path}/runs/a",
        f"{tmp_path}/shards",
        f"{tmp_path}/ck/checkpoint-2",
    )
    (tmp_path / "mine.yaml").write_text("run_dir: ~/r\ndata:\n  shards: pipe:cat ~/x.tar\n")
    config = load_config(["recipe=~/mine.yaml"])
    assert (config.run_dir, config.data.shards) == (f"{tmp_path}/r", "pipe:cat ~/x.tar")  # a command: as written


def test_a_recipe_yaml_a_run_saved_keeps_the_recipes_name(tmp_path):
    # `cvae-tk train recipe=RUN/recipe.yaml run_dir=RUN resume=latest` (what a run without its final model
    # suggests) named the run's recipe 'recipe' in its config.json and every export's metadata
    from toolkit.config import to_yaml

    saved = tmp_path / "run" / "recipe.yaml"
    saved.parent.mkdir()
    saved.write_text(to_yaml(load_config(["recipe=digits", f"run_dir={saved.parent}"])))
    assert load_config([f"recipe={saved}"]).recipe == "digits"
    (tmp_path / "mine.yaml").write_text("max_steps: 3\n")  # a recipe that does not name itself: its file's name
    config = load_config([f"recipe={tmp_path / 'mine.yaml'}"])
    assert (config.recipe, config.run_dir) == ("mine", "runs/mine")


@pytest.mark.parametrize(
    "resume",
    [
        "latest",
        "{run}/checkpoints/checkpoint-3",
        "{run}/../run/checkpoints/./checkpoint-3/",  # the same checkpoint however it is spelt
    ],
)
def test_overwrite_and_a_resume_of_the_same_run_are_refused_as_a_contradiction(tmp_path, resume):
    """overwrite=true replaces the run that run_dir holds, resume= continues it: which was meant cannot
    be told (it continued a run with a checkpoint and replaced one without, silently either way)."""
    run = tmp_path / "run"
    with pytest.raises(UserError) as caught:
        load_config(["recipe=digits", f"run_dir={run}", "overwrite=true", f"resume={resume.format(run=run)}"])
    assert "overwrite=true and resume=" in str(caught.value) and "contradict" in str(caught.value)
    assert str(run) in str(caught.value)


def test_overwrite_against_a_resume_from_the_recipe_file_says_where_that_resume_is(tmp_path):
    """A run's saved recipe.yaml records resume=latest when the run was resumed: `recipe=RUN/recipe.yaml
    overwrite=true`, to train it again, was told to 'give one of them' where only one was typed."""
    run = tmp_path / "run"
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(f"recipe: digits\nrun_dir: {run}\nresume: latest\n")
    with pytest.raises(UserError) as caught:
        load_config([f"recipe={recipe}", "overwrite=true"])
    assert f"(resume=latest is in recipe {recipe}: resume= on the command line clears it)" in str(caught.value)
    assert load_config([f"recipe={recipe}", "overwrite=true", "resume="]).overwrite
    recipe.write_text(f"recipe: digits\nrun_dir: {run}\noverwrite: true\n")
    with pytest.raises(UserError) as caught:
        load_config([f"recipe={recipe}", "resume=latest"])
    assert "(overwrite=true is in recipe" in str(caught.value) and "overwrite=false on the command line" in str(
        caught.value
    )


def test_overwrite_with_a_checkpoint_of_another_folder_forks_into_run_dir(tmp_path):
    """A checkpoint of another folder starts a new run from it: replacing run_dir's run is consistent."""
    other = tmp_path / "other" / "checkpoints" / "checkpoint-3"
    config = load_config(["recipe=digits", f"run_dir={tmp_path / 'run'}", "overwrite=true", f"resume={other}"])
    assert config.overwrite and config.resume == str(other)
    assert load_config(["recipe=digits", "resume=latest", "overwrite=false"]).resume == "latest"


def refused_as_written_and_in_a_recipe(tmp_path, key, written, said, said_of_recipe, yaml=None):
    """`key=written` on the command line, and `key: yaml` (default: `written`) in a recipe file: each
    one UserError naming where the value came from, then `said` / `said_of_recipe` (regexes)."""
    with pytest.raises(UserError, match=f"'{key}' in the command line: {said}"):
        load_config(["recipe=digits", f"{key}={written}"])
    section, _, name = key.rpartition(".")
    line = f"{name}: {written if yaml is None else yaml}\n"
    recipe = tmp_path / "mine.yaml"
    recipe.write_text(f"{section}:\n  {line}" if section else line)
    with pytest.raises(UserError, match=f"'{key}' in recipe {recipe}: {said_of_recipe}"):
        load_config([f"recipe={recipe}"])
    return recipe


@pytest.mark.parametrize("key", ["overwrite", "data.record_keys"])
@pytest.mark.parametrize("value", ["2", "-1", "10"])
def test_a_number_other_than_0_or_1_is_not_taken_for_true(tmp_path, key, value):
    """OmegaConf read any integer as true: overwrite=-1 (off, in some tools' habit) replaced the run."""
    refused_as_written_and_in_a_recipe(
        tmp_path, key, value, f"expected true or false, got {value}", "expected true or false"
    )
    assert load_config(["recipe=digits", f"{key}=1"]) != load_config(["recipe=digits", f"{key}=0"])
    assert load_config(["recipe=digits", f"{key}=yes"]) == load_config(["recipe=digits", f"{key}=true"])


@pytest.mark.parametrize("key", ["overwrite", "data.record_keys"])
@pytest.mark.parametrize(
    "written, shown",
    [
        ("${max_steps}", "which is 1000"),
        ("${oc.decode:'2'}", "which is 2"),
        ("${oc.env:CVAE_TK_TEST_FLAG}", "which is '-1'"),
    ],
)
def test_a_number_reached_through_interpolation_is_not_taken_for_true(tmp_path, monkeypatch, key, written, shown):
    """overwrite=${max_steps} (or an environment variable holding -1) was converted only once resolved,
    past the check of the values as written: any integer became true and replaced the run."""
    monkeypatch.setenv("CVAE_TK_TEST_FLAG", "-1")
    with pytest.raises(UserError) as caught:
        load_config(["recipe=digits", f"{key}={written}"])
    assert f"'{key}' on the command line: expected true or false, got {written}, {shown}" in str(caught.value)
    section, _, name = key.rpartition(".")
    recipe = tmp_path / "mine.yaml"
    line = f'{name}: "{written}"\n'
    recipe.write_text("recipe: digits\n" + (f"{section}:\n  {line}" if section else line))
    with pytest.raises(UserError, match=f"'{key}' in recipe {recipe}: expected true or false"):
        load_config([f"recipe={recipe}"])
    monkeypatch.setenv("CVAE_TK_TEST_FLAG", "1")
    assert load_config(["recipe=digits", f"{key}=${{oc.env:CVAE_TK_TEST_FLAG}}"]) == load_config(
        ["recipe=digits", f"{key}=true"]
    )
    assert load_config(["recipe=digits", f"{key}=${{seed}}"]) == load_config(["recipe=digits", f"{key}=false"])


@pytest.mark.parametrize("value", ["2", "-1"])
def test_a_quoted_number_other_than_0_or_1_is_not_taken_for_true(tmp_path, value):
    """A quoted "2" is a text, which OmegaConf also read as an integer and took as true."""
    refused_as_written_and_in_a_recipe(
        tmp_path, "overwrite", f"'{value}'", f"expected true or false, got {value}", "expected true or false",
        yaml=f'"{value}"',
    )  # fmt: skip
    assert load_config(["recipe=digits", "overwrite='1'"]).overwrite


@pytest.mark.parametrize(
    "key, written, read",
    [("max_steps", "0100", "64"), ("seed", "0123", "83"), ("max_steps", "1:30", "90"), ("lr", "1:30", "90")],
)
def test_a_number_yaml_would_read_otherwise_than_it_looks_is_refused(tmp_path, key, written, read):
    """YAML 1.1 (OmegaConf's reading) takes a leading 0 as octal and colons as base 60: seed=0123 trained
    with seed 83, max_steps=1:30 ran 90 steps, silently."""
    said = f"'{written}' would be read as {read} "
    recipe = refused_as_written_and_in_a_recipe(tmp_path, key, written, said, said)
    recipe.write_text(f"run_dir: {written}\n")  # text keys take the text as written
    assert load_config([f"recipe={recipe}"]).run_dir == written
    config = load_config(["recipe=digits", "max_steps=100", "seed=0", "lr=010.5", "batch_size=0x10"])
    assert (config.max_steps, config.seed, config.lr, config.batch_size) == (100, 0, 10.5, 16)


@pytest.mark.parametrize("sampling", ["resampled", "epochs"])
@pytest.mark.parametrize("cpus, most", [(1, 16), (2, 16), (8, 32)])
def test_more_loader_workers_than_the_cpus_can_serve_are_refused(monkeypatch, sampling, cpus, most):
    """data.sampling=resampled bounds data.num_workers by nothing (epochs by the shard count, which a
    large dataset makes large too): num_workers=100000 started that many loader processes per rank."""
    import toolkit.config

    monkeypatch.setattr(toolkit.config, "usable_cpus", lambda: cpus)
    args = ["recipe=digits", f"data.sampling={sampling}"]
    assert load_config([*args, f"data.num_workers={most}"]).data.num_workers == most
    for workers in (most + 1, 100000):
        with pytest.raises(UserError) as caught:
            load_config([*args, f"data.num_workers={workers}"])
        line = str(caught.value)
        assert "\n" not in line and "'data.num_workers'" in line
        assert f"at most {most} loader processes per rank" in line and f"of the {cpus} this process may use" in line
        assert f"got {workers}" in line
