"""Recipes: a YAML file plus `key=value` overrides (OmegaConf dotlist style) -> one typed config.

    load_config(["recipe=digits", "max_steps=500", "data.shards=shards/mine"])

The schema below is the single source of truth for keys, types and defaults. An unknown key
or a value of the wrong type is a `UserError` naming the key.
"""

from __future__ import annotations

import difflib
import math
import os
import re
from dataclasses import dataclass, field, fields, is_dataclass
from pathlib import Path

import yaml
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from toolkit.errors import UserError, one_line
from toolkit.formats import ARCH_OPTIONS, ARCHS, PRIORS
from toolkit.paths import is_utf8, shown

# The recipes: the repository's recipes/ (a source tree, an editable install), which a wheel or a plain
# `pip install .` carries as toolkit/recipes (pyproject.toml); a recipe in the current folder wins.
_PACKAGE = Path(__file__).resolve().parent
PACKAGED_RECIPES = next(
    (folder for folder in (_PACKAGE / "recipes", _PACKAGE.parent / "recipes") if folder.is_dir()),
    _PACKAGE.parent / "recipes",
)

PRECISIONS = ("auto", "no", "fp16", "bf16")
OPTIMIZERS = ("adam", "adamw")
SCHEDULES = ("constant", "cosine")
SAMPLINGS = ("epochs", "resampled")
PATH_KEYS = ("run_dir", "data.shards", "resume")
MERGE_TAG = "tag:yaml.org,2002:merge"  # YAML's `<<: *anchor`
# The model.* options each arch reads (toolkit.formats). Setting another arch's option does nothing: refused.
ARCH_KEYS = {arch: tuple(options) for arch, options in ARCH_OPTIONS.items()}


@dataclass
class DataConfig:
    shards: str = "shards/digits"  # the folder `cvae-tk shards` wrote (holds train/ and test/)
    num_workers: int = 1  # DataLoader worker processes per rank
    shuffle_buffer: int = 1000  # samples shuffled in memory before decoding
    sampling: str = "epochs"  # epochs: disjoint shards per rank, each sample once per epoch | resampled
    record_keys: bool = False  # write RUN/seen/rank-<r>.txt: the sample keys each rank trained on
    # stop once more than this fraction of the samples read could not be (cut-off tars, undecodable
    # images; skipped and counted meanwhile), of no fewer than the split's size; 0: at the first one
    max_skipped_fraction: float = 0.01


@dataclass
class ModelConfig:
    arch: str = "paper"  # paper: the paper's architecture (docs/method.md) | resnet: deeper, for 64x64 / 128x128
    latent_dim: int = 128
    prior: str = "standard"  # standard: N(0, I) (the paper's code) | learned: p(z | x) from the attributes
    width: int = ARCH_OPTIONS["resnet"]["width"]  # resnet: channels of the first level (doubling per level, up to 2x)
    # resnet: downsamplings (64x64 -> 4x4); H and W must be multiples of 2**levels
    levels: int = ARCH_OPTIONS["resnet"]["levels"]
    # resnet: size of the attribute embedding that conditions every block
    embed_dim: int = ARCH_OPTIONS["resnet"]["embed_dim"]


@dataclass
class TrainConfig:
    recipe: str = ""  # set from `recipe=NAME`; names the default run folder
    run_dir: str = ""  # default: runs/<recipe>
    seed: int = 0
    max_steps: int = 2000
    batch_size: int = 64
    lr: float = 1e-3
    beta: float = 0.5  # loss = (1 - beta) * MSE + beta * KL
    gsnn_weight: float = (
        0.0  # g > 0: Sohn et al.'s hybrid loss (1 - g) * that + g * (1 - beta) * MSE of a prior sample
    )
    mixed_precision: str = "auto"  # auto: whatever `accelerate launch` / its config says
    log_every: int = 50
    sample_every: int = 500  # sample and reconstruction grids every N steps (and at the end)
    eval_every: int = 0  # test-split MSE / KL every N steps; 0: at each epoch end (sampling=epochs)
    optimizer: str = "adam"  # adam | adamw
    weight_decay: float = 0.0
    lr_schedule: str = "constant"  # constant | cosine (after warm-up)
    warmup_steps: int = 0
    grad_accum: int = 1  # micro-batches per optimizer step
    grad_clip: float = 0.0  # max gradient norm; 0: no clipping
    max_bad_steps: int = 5  # stop after this many consecutive non-finite losses
    checkpoint_every: int = 1000  # accelerate save_state into RUN/checkpoints/checkpoint-<step>
    checkpoints_total_limit: int = 3  # keep the newest N checkpoints
    resume: str = ""  # latest | a checkpoint folder
    overwrite: bool = False  # replace the run that run_dir holds (its checkpoints, model, samples, logs)
    dist_timeout_s: float = (
        1800.0  # several processes: a collective waiting longer than this fails (a rank died or froze)
    )
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)


def available_recipes() -> list[str]:
    names = {p.stem for p in PACKAGED_RECIPES.glob("*.yaml")}
    names |= {p.stem for p in Path("recipes").glob("*.yaml")}
    return sorted(names)


def find_recipe(name: str) -> Path:
    """`digits` -> recipes/digits.yaml (current folder first, then the packaged ones); a path is taken as is."""
    if name.endswith((".yaml", ".yml")) or "/" in name:
        path = Path(os.path.expanduser(name))
        if os.path.isdir(path):
            raise UserError(f"recipe={name} is a folder: expected a YAML file such as recipes/digits.yaml")
        if not os.path.isfile(path):  # os.path: False (not OSError / ValueError) for too long names or NUL bytes
            raise UserError(f"recipe file not found: {path}")
        return path
    for folder in (Path("recipes"), PACKAGED_RECIPES):
        path = folder / f"{name}.yaml"
        if os.path.isfile(path):
            return path
    raise UserError(
        f"unknown recipe '{name}': expected recipes/{name}.yaml; available: {', '.join(available_recipes())}"
    )


def _all_keys(node: DictConfig | dict, prefix: str = "") -> list[str]:
    """Every leaf key ('data.shards'), its ${...} left unresolved: reading one may fail or loop."""
    tree = OmegaConf.to_container(node, resolve=False) if isinstance(node, DictConfig) else node
    keys = []
    for key, value in tree.items():
        full = f"{prefix}{key}"
        keys += _all_keys(value, full + ".") if isinstance(value, dict) else [full]
    return keys


def recipe_keys() -> list[str]:
    """Every key a recipe or a `key=value` argument may set ('max_steps', 'data.shards', ...)."""
    return _all_keys(OmegaConf.structured(TrainConfig))


def _explain(error: OmegaConfBaseException, source: str, schema: DictConfig, key: str | None = None) -> UserError:
    """`key`: the key as typed, for errors that do not name one (OmegaConf leaves full_key empty for some)."""
    key = getattr(error, "full_key", None) or key or "?"
    valid = _all_keys(schema)
    try:
        node = OmegaConf.select(schema, key, default=None, throw_on_missing=False)
    except Exception:  # a key OmegaConf cannot even parse, such as '['
        node = None
    if isinstance(node, DictConfig):
        return UserError(
            f"config key '{key}' in {source} is a group, not a value: set its keys one by one "
            f"({', '.join(k for k in valid if k.startswith(key + '.'))})"
        )
    if type(error).__name__ in ("ConfigKeyError", "ConfigAttributeError") or key not in valid:
        close = difflib.get_close_matches(key, valid, n=3)
        hint = f"; did you mean {', '.join(close)}?" if close else f"; valid keys: {', '.join(valid)}"
        return UserError(f"unknown config key '{key}' in {source}{hint}")
    expected = OmegaConf.select(schema, key)
    return UserError(f"bad value for config key '{key}' in {source}: expected {type(expected).__name__}")


def _merge(
    config: DictConfig, other: DictConfig, source: str, schema: DictConfig, key: str | None = None
) -> DictConfig:
    try:
        return OmegaConf.merge(config, other)
    except OmegaConfBaseException as error:
        raise _explain(error, source, schema, key) from None


def parse_overrides(args: list[str]) -> tuple[str | None, list[str]]:
    """Split `recipe=NAME` from the other `key=value` arguments; reject anything else."""
    recipe, dotlist = None, []
    for arg in args:
        key, sep, value = arg.partition("=")
        bare = arg.lstrip("-")
        if bare != arg and bare.partition("=")[0].strip():  # `--max_steps 3`, as other tools take options
            written = bare if "=" in bare else f"{bare}=VALUE"
            raise UserError(f"expected key=value, got '{arg}': a key is written without dashes, as {written}")
        if not sep or not key.strip():
            raise UserError(f"expected key=value, got '{arg}'")
        if key == "recipe":
            recipe = value
        else:
            dotlist.append(arg)
    return recipe, dotlist


def load_config(args: list[str], default_recipe: str | None = None) -> TrainConfig:
    recipe, dotlist = parse_overrides(args)
    recipe = recipe or default_recipe
    if not recipe:
        raise UserError(f"no recipe given: pass recipe=NAME (available: {', '.join(available_recipes())})")
    schema = OmegaConf.structured(TrainConfig)
    path = find_recipe(recipe)
    from_file = _read_recipe(path, schema)
    _refuse_numbers_as_bools(from_file, f"recipe {path}", schema)
    config = _merge(schema, from_file, f"recipe {path}", schema)
    given = {f"in recipe {path}": _all_keys(from_file)}  # the keys set explicitly, and where
    for item in dotlist:
        key, _, value = item.partition("=")
        if not value.strip() and key != "resume":  # `resume=` is "start afresh"; elsewhere "" falls to a default
            raise UserError(
                f"bad override '{item}': the value is empty (an unset shell variable?); "
                "give a value, or leave the key out for its default"
            )
        try:
            if isinstance(OmegaConf.select(schema, key, default=None), str):
                # a text key takes the text as typed: YAML would read `no` (mixed_precision=no) as false
                single = OmegaConf.create()
                OmegaConf.update(single, key, value, force_add=True)
            else:
                single = OmegaConf.from_dotlist([item])
        except Exception as error:  # OmegaConf and YAML errors alike
            raise UserError(f"bad override '{item}': {one_line(error)}") from None
        # one override at a time, so an error the merge does not attribute still names its key
        _refuse_numbers_as_bools(single, "the command line", schema)
        _refuse_misread_number(key, value, "the command line", schema)
        config = _merge(config, single, "the command line", schema, key)
        given.setdefault("on the command line", []).append(key)
    try:  # reading a value resolves its ${...} interpolation, which may fail
        # a recipe.yaml that a run saved names its recipe: run again, it keeps that name (not "recipe")
        config.recipe = config.recipe or path.stem
        if not config.run_dir:
            config.run_dir = f"runs/{config.recipe}"
        _refuse_interpolated_numbers_as_bools(config, given, schema)
        result: TrainConfig = OmegaConf.to_object(config)
    except OmegaConfBaseException as error:
        key = getattr(error, "full_key", None) or "?"
        raise UserError(
            f"config key '{key}': {one_line(str(error).splitlines()[0] if str(error) else type(error).__name__)}"
        ) from None
    for key in PATH_KEYS:  # `run_dir=~/x` reaches us unexpanded from sh, zsh and recipe files
        section, _, name = key.rpartition(".")
        holder = getattr(result, section) if section else result
        if getattr(holder, name).startswith("~"):
            setattr(holder, name, os.path.expanduser(getattr(holder, name)))
    validate(result, given)
    _refuse_ignored_keys(result, given)
    return result


# numbers YAML 1.1 (OmegaConf's reading) takes otherwise than they look: 0100 is octal 64, 1:30 base 60 (90)
MISREAD_NUMBER = re.compile(r"[-+]?(0[0-9_]+|[0-9][0-9_]*(:[0-5]?[0-9])+(\.[0-9_]*)?)")


def _refuse_misread_number(key: str, written: str, source: str, schema: DictConfig) -> None:
    """A number key written with a leading zero (seed=0123, max_steps=0100) or colons (max_steps=1:30)
    was taken silently as YAML 1.1 reads it (83, 64, 90): refuse it, naming what it would have been."""
    try:
        expected = OmegaConf.select(schema, key, default=None)
    except Exception:  # a key OmegaConf cannot parse: the merge names it
        return
    if isinstance(expected, bool) or not isinstance(expected, (int, float)):
        return
    text = written.strip()
    if MISREAD_NUMBER.fullmatch(text):
        why = "colons as base 60" if ":" in text else "a leading 0 as octal"
        raise UserError(
            f"bad value for config key '{key}' in {source}: '{text}' would be read as {yaml.safe_load(text)!r} "
            f"(YAML takes {why}); write the number in decimal without leading zeros"
        )


def _as_bool_number(value) -> int | None:
    """The integer OmegaConf reads a true/false key's value as: an int, or a text int() parses
    ('2', ' -1', as a quoted YAML value or a resolver's text gives it); None for anything else."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, str):
        try:
            return int(value)
        except ValueError:
            return None
    return None


def _refuse_numbers_as_bools(node: DictConfig, source: str, schema: DictConfig) -> None:
    """OmegaConf takes any integer for a true/false key (overwrite=2, overwrite=-1, overwrite: "2": true,
    the run replaced): only 0 and 1 mean false and true."""
    tree = OmegaConf.to_container(node, resolve=False)
    for key in _bool_keys(schema):
        value = tree
        for part in key.split("."):
            value = value.get(part) if isinstance(value, dict) else None
        number = _as_bool_number(value)
        if number is not None and number not in (0, 1):
            raise UserError(f"bad value for config key '{key}' in {source}: expected true or false, got {value}")


def _refuse_interpolated_numbers_as_bools(config: DictConfig, given: dict[str, list[str]], schema: DictConfig) -> None:
    """A true/false key given as ${...} (overwrite=${max_steps}, ${oc.env:VAR}, ${oc.decode:...}) is
    converted once resolved, any integer to true, unseen by the check of the values as written: resolve
    it on an untyped copy, which keeps the value it stands for, and apply the same rule."""
    untyped = None
    for key in _bool_keys(schema):
        section, _, name = key.rpartition(".")
        if not OmegaConf.is_interpolation(OmegaConf.select(config, section) if section else config, name):
            continue
        if untyped is None:
            untyped = OmegaConf.create(OmegaConf.to_container(config, resolve=False))
        try:
            value = OmegaConf.select(untyped, key, throw_on_missing=True)
        except Exception:  # one that cannot resolve (a missing key, a loop) is named when the config is read
            continue
        number = _as_bool_number(value)
        if number is not None and number not in (0, 1):
            written = OmegaConf.to_container(config, resolve=False)
            for part in key.split("."):
                written = written[part]
            source = next((where for where, keys in reversed(given.items()) if key in keys), "in the recipe")
            raise UserError(
                f"bad value for config key '{key}' {source}: expected true or false, got {written}, which is {value!r}"
            )


def _bool_keys(schema: DictConfig) -> list[str]:
    return [key for key in _all_keys(schema) if isinstance(OmegaConf.select(schema, key), bool)]


def _read_recipe(path: Path, schema: DictConfig) -> DictConfig:
    """The recipe file as a mapping of keys; an empty file, a list or a scalar is a UserError."""
    try:
        text = path.read_text(encoding="utf-8")
        shape = yaml.safe_load(text)  # only to tell what the top level is; OmegaConf reads the values
        loaded = OmegaConf.create(text) if isinstance(shape, dict) else None
        if loaded is not None:
            text_keys = {key for key in _all_keys(schema) if isinstance(OmegaConf.select(schema, key), str)}
            _text_as_written(loaded, text, text_keys)
    except OSError as error:
        raise UserError(f"could not read recipe {path}: {error.strerror or error}") from None
    except Exception as error:  # YAML syntax errors come in many types; bytes that are not UTF-8
        raise UserError(f"recipe {path} is not valid YAML: {one_line(error)}") from None
    if loaded is not None:
        for key, written in _plain_scalars(yaml.compose(text, Loader=yaml.SafeLoader)).items():
            _refuse_misread_number(key, written, f"recipe {path}", schema)
    if shape is None:
        raise UserError(
            f"recipe {path} is empty: expected a mapping of config keys, such as `max_steps: 1000` (see `cvae-tk recipes`)"
        )
    if loaded is None:
        raise UserError(
            f"recipe {path} is a YAML {type(shape).__name__}, not a mapping: expected config keys with values, "
            "such as `max_steps: 1000` (see `cvae-tk recipes`)"
        )
    return loaded


def _text_as_written(loaded: DictConfig, text: str, text_keys: set[str]) -> None:
    """A text key of the recipe file takes its value as written, as on the command line: YAML reads
    a bare `no` (mixed_precision: no) as false, `run_dir: 2024_01` as the number 202401."""
    raw = OmegaConf.to_container(loaded, resolve=False)
    for key, written in _plain_scalars(yaml.compose(text, Loader=yaml.SafeLoader)).items():
        value = raw
        for part in key.split("."):
            value = value.get(part) if isinstance(value, dict) else None
        if key in text_keys and value is not None and not isinstance(value, str):
            OmegaConf.update(loaded, key, written, merge=False)


def _plain_scalars(node: yaml.Node, prefix: str = "") -> dict[str, str]:
    """{key: the text written} of every unquoted value of a YAML mapping, as its keys resolve: merge
    keys (`<<: *base`) first, the first of their sources winning, then the keys written beside them."""
    found = {}
    entries = node.value if isinstance(node, yaml.MappingNode) else []
    for key_node, value_node in sorted(entries, key=lambda entry: entry[0].tag != MERGE_TAG):
        if key_node.tag == MERGE_TAG:
            sources = value_node.value if isinstance(value_node, yaml.SequenceNode) else [value_node]
            for source in reversed(sources):
                found.update(_plain_scalars(source, prefix))
        elif isinstance(value_node, yaml.MappingNode):
            found.update(_plain_scalars(value_node, f"{prefix}{key_node.value}."))
        elif isinstance(value_node, yaml.ScalarNode) and value_node.style is None:
            found[f"{prefix}{key_node.value}"] = value_node.value
    return found


def _refuse_ignored_keys(config: TrainConfig, given: dict[str, list[str]]) -> None:
    """A model option that the chosen arch does not read, set to anything but its default, would do
    nothing: say so instead of training without it. (The default is let through: a saved
    recipe.yaml lists every key.)"""
    takes = ARCH_KEYS[config.model.arch]
    for source, keys in given.items():
        for key in keys:
            name = key.removeprefix("model.")
            users = [arch for arch, options in ARCH_KEYS.items() if name in options]
            if (
                key.startswith("model.")
                and users
                and name not in takes
                and getattr(config.model, name) != getattr(ModelConfig, name)
            ):
                raise UserError(
                    f"config key '{key}' ({source}) does nothing with model.arch={config.model.arch}, which takes "
                    f"{', '.join('model.' + k for k in takes) or 'no options besides model.latent_dim and model.prior'}; "
                    f"only model.arch={' | '.join(users)} reads it: remove it or choose that arch"
                )


# data.num_workers: loader processes per rank decode on the machine's CPUs; beyond a few per CPU they only
# compete for them, and a huge value (sampling=resampled, which no shard count bounds) started that many
# processes. The floor keeps every shipped recipe valid on a one-CPU machine.
WORKERS_PER_CPU = 4
MIN_WORKER_LIMIT = 16


def usable_cpus() -> int:
    """The CPUs this process may run on (taskset, a Slurm allocation), else the machine's."""
    try:
        return max(len(os.sched_getaffinity(0)), 1)
    except (AttributeError, OSError):  # macOS, Windows
        return os.cpu_count() or 1


def validate(config: TrainConfig, given: dict[str, list[str]] | None = None) -> None:
    """Refuse values no training takes. `given`: where keys were set (load_config's), for the lines."""

    def check(ok: bool, key: str, expected: str) -> None:
        if not ok:
            raise UserError(f"bad value for config key '{key}': expected {expected}")

    for key, value in _leaves(config):
        # torch and numpy take 64-bit integers: a larger one was a traceback (or a hang) mid-setup
        if isinstance(value, int) and not isinstance(value, bool):
            check(-(2**63) <= value < 2**63, key, f"an integer below 2**63, got {value}")
        # recipe.yaml records the run as UTF-8 text; bytes that are not (a Linux file name may hold them) cannot be
        if isinstance(value, str):
            check(is_utf8(value), key, f"UTF-8 text, got '{shown(value)}': rename it")
    check(0 <= config.seed < 2**32, "seed", "an integer in [0, 2**32)")  # what numpy's seeding takes
    check(config.max_steps > 0, "max_steps", "a positive integer")
    check(config.batch_size > 0, "batch_size", "a positive integer")
    check(0 < config.lr < math.inf, "lr", "a positive finite number")
    check(0.0 <= config.beta <= 1.0, "beta", "a number in [0, 1]")
    check(
        0.0 <= config.gsnn_weight < 1.0,
        "gsnn_weight",
        "a number in [0, 1) (0: the paper's loss; 1 would leave the encoder untrained)",
    )
    check(config.mixed_precision in PRECISIONS, "mixed_precision", " | ".join(PRECISIONS))
    check(config.log_every > 0, "log_every", "a positive integer")
    check(config.sample_every > 0, "sample_every", "a positive integer")
    check(config.eval_every >= 0, "eval_every", "an integer >= 0")
    check(config.optimizer in OPTIMIZERS, "optimizer", " | ".join(OPTIMIZERS))
    check(0 <= config.weight_decay < math.inf, "weight_decay", "a finite number >= 0")
    check(config.lr_schedule in SCHEDULES, "lr_schedule", " | ".join(SCHEDULES))
    check(config.warmup_steps >= 0, "warmup_steps", "an integer >= 0")
    check(config.grad_accum >= 1, "grad_accum", "an integer >= 1")
    check(0 <= config.grad_clip < math.inf, "grad_clip", "a finite number >= 0 (0: off)")
    check(config.max_bad_steps >= 1, "max_bad_steps", "an integer >= 1")
    check(config.checkpoint_every > 0, "checkpoint_every", "a positive integer")
    check(config.checkpoints_total_limit >= 1, "checkpoints_total_limit", "an integer >= 1")
    check(0 < config.dist_timeout_s < 10**7, "dist_timeout_s", "a number of seconds > 0 (and below 10**7)")
    check(config.data.sampling in SAMPLINGS, "data.sampling", " | ".join(SAMPLINGS))
    check(config.data.num_workers >= 0, "data.num_workers", "an integer >= 0")
    cpus = usable_cpus()
    most = max(WORKERS_PER_CPU * cpus, MIN_WORKER_LIMIT)
    check(
        config.data.num_workers <= most,
        "data.num_workers",
        f"at most {most} loader processes per rank ({WORKERS_PER_CPU} per CPU of the {cpus} this process may use), "
        f"got {config.data.num_workers}: each worker is a process of its own, decoding on those CPUs and holding "
        "its own memory; more only compete for them",
    )
    check(config.data.shuffle_buffer >= 1, "data.shuffle_buffer", "an integer >= 1")
    check(
        0.0 <= config.data.max_skipped_fraction <= 1.0,
        "data.max_skipped_fraction",
        "a number in [0, 1] (0: no unreadable sample allowed)",
    )
    check(config.model.arch in ARCHS, "model.arch", " | ".join(ARCHS))
    check(config.model.latent_dim > 0, "model.latent_dim", "a positive integer")
    check(config.model.prior in PRIORS, "model.prior", " | ".join(PRIORS))
    check(config.model.width > 0, "model.width", "a positive integer")
    check(config.model.levels > 0, "model.levels", "a positive integer")
    check(config.model.embed_dim > 0, "model.embed_dim", "a positive integer")
    if config.overwrite and continues_run_dir(config.resume, config.run_dir):
        # which was meant cannot be told: a job script passing both replaced a run without a
        # checkpoint and continued one with a checkpoint, silently either way
        raise UserError(
            f"overwrite=true and resume={config.resume} contradict each other: overwrite=true replaces the run in "
            f"run_dir={config.run_dir} (its checkpoints too), resume={config.resume} continues it; give one of them"
            + _from_recipe_only(config, given or {})
        )


def _from_recipe_only(config: TrainConfig, given: dict[str, list[str]]) -> str:
    """Where one of overwrite / resume was set only by the recipe file (a run's saved recipe.yaml records
    resume=latest when it was resumed: `recipe=RUN/recipe.yaml overwrite=true` to train it again), how to
    clear it there: the user typed only the other."""
    typed = set(given.get("on the command line", []))
    for key, value, clear in (("resume", config.resume, "resume="), ("overwrite", "true", "overwrite=false")):
        source = next((where for where, keys in given.items() if key in keys), None)
        if key not in typed and source is not None:
            return f" ({key}={value} is {source}: {clear} on the command line clears it)"
    return ""


def continues_run_dir(resume: str, run_dir: str | Path) -> bool:
    """Whether resume= continues the run that run_dir holds: latest, or a checkpoint inside run_dir
    (`run_dir/checkpoints/checkpoint-<step>`, however the path is spelt). A checkpoint of another
    folder starts a new run from it (a fork)."""
    if resume == "latest":
        return True
    if not resume:
        return False
    try:
        return Path(resume).resolve().parent.parent == Path(run_dir).resolve()
    except (OSError, ValueError, RuntimeError):  # a NUL byte, a loop of links: not a checkpoint of run_dir
        return False


def _leaves(config, prefix: str = ""):
    """(key, value) of every field of `config` and its sections."""
    for item in fields(config):
        value = getattr(config, item.name)
        if is_dataclass(value):
            yield from _leaves(value, f"{prefix}{item.name}.")
        else:
            yield prefix + item.name, value


def to_yaml(config: TrainConfig) -> str:
    return OmegaConf.to_yaml(OmegaConf.structured(config))
