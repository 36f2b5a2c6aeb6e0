"""The paper's study in one command: train one model per beta, evaluate them, write Table 1 and Figures 3-5.

    cvae-tk sweep recipe=digits betas=[0.25,0.5,0.75,0.9] [key=value ...] [--out DIR] [--classifier DIR] [--launcher CMD]
    run_sweep(["recipe=digits", "betas=[0.5,0.9]", "max_steps=200"], out="runs/sweep-digits")

Every beta trains with the same recipe and overrides into OUT/beta-<b>, each in its own process
(`python toolkit/train.py ...`, or `<launcher> toolkit/train.py ...` such as `accelerate launch
--multi_gpu`), because Accelerate fixes devices and precision once per process. A run whose
model.safetensors exists and whose recipe.yaml equals what the sweep would train (logging and
loader workers aside) is reused; any other is (re)started with resume=latest, so an interrupted
sweep continues where it stopped. Refused before anything trains rather than mixed in: a run folder
holding a run with other settings, a run trained on other shards than data.shards holds now (its
newest checkpoint's fingerprint), a run folder its training process would refuse (the user's
files in it), and an OUT holding the runs of a sweep with other settings. OUT
is locked (OUT/.lock) while a sweep writes it.

OUT then holds table1.md / table1.csv (Table 1: MSE per image and per pixel, KL per image, plus
attribute accuracy, its shuffled floor and diversity; one row per beta, highest first), figure3.png
(prior samples, one row per beta, same conditions and noise), figure4.png (test images, then their
reconstructions per beta), figure5.png (one model: a base attribute set, then one change per row),
loss_curves.png (train/loss, train/mse, train/kl per beta from the TensorBoard logs) and
sweep.json (everything: settings, per-run status, metrics, figure layouts). The files are one set:
written under temporary names and renamed only once all are written (sweep.json last).
"""

from __future__ import annotations

import codecs
import csv
import dataclasses
import io
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import yaml
from omegaconf import OmegaConf

from toolkit import figures
from toolkit.atomic import atomic_paths, check_output
from toolkit.classifier import RELIABLE_BALANCED, check_image_size, columns_for, load_classifier
from toolkit.config import TrainConfig, load_config, parse_overrides
from toolkit.data.stream import is_url, read_manifest
from toolkit.devices import resolve_device
from toolkit.entry import IN_SWEEP, when_stdout_closes
from toolkit.errors import UserError, cut, one_line, printable
from toolkit.evaluate import CONTROL_CONDITIONS, DIVERSITY_CONDITIONS, DIVERSITY_SAMPLES, evaluate_run, find_classifier
from toolkit.formats import (
    CLASSIFIER_WEIGHTS,
    CONFIG,
    MANIFEST,
    METRICS,
    RECIPE,
    WEIGHTS,
    attribute_column,
    attribute_index,
)
from toolkit.model import load_model, read_spec
from toolkit.ownership import FolderLock, claim_folder
from toolkit.run_folder import checkpoint_step, claim_run_dir, find_checkpoint, trained_shards_difference

PAPER_BETAS = (0.25, 0.5, 0.75, 0.9)
SHELL_CUT = (
    "the shell cut the list at a space: write it without spaces (betas=[0.5,0.9]) or quote it ('betas=[0.5, 0.9]')"
)
EVAL_BATCH_SIZE = 256  # of the sweep's evaluation: a metrics.json measured with another is measured again
SET_BY_SWEEP = ("beta", "run_dir", "resume")  # the sweep sets these per run
# Keys that do not change the experiment (what the first N steps compute, or only the order the data
# is read in): a run that differs only in these is reused when finished with the same max_steps, else
# continued (resume=latest) rather than refused, e.g. a sweep asked for more steps.
# how long a collective may wait: changes nothing a step computes
RESUMABLE_KEYS = {
    "max_steps",
    "log_every",
    "sample_every",
    "eval_every",
    "checkpoint_every",
    "checkpoints_total_limit",
    "max_bad_steps",
    "data.max_skipped_fraction",  # a bound that stops a run; the steps it let through are the same
    "dist_timeout_s",
    # how the data is read, not which: resume warns of the other order (`cvae-tk train` does too)
    "data.num_workers",
    "data.record_keys",
}
# the same folder by construction; resume and overwrite are how, not what
IGNORED_KEYS = {
    "run_dir",
    "resume",
    "overwrite",
}
TRAIN_SCRIPT = Path(__file__).resolve().parent / "train.py"
STOP_GRACE_S = 10  # an interrupted sweep waits this long for its training process to stop before killing it
OWNER = ".cvae-tk-sweep"  # marks OUT as a sweep's: its OUTPUTS may be replaced (toolkit.ownership.claim_folder)
OUTPUTS = ("table1.md", "table1.csv", "figure3.png", "figure4.png", "figure5.png", "loss_curves.png", "sweep.json")
TABLE_COLUMNS = [  # (csv name, markdown header, format)
    ("beta", "beta", "{:g}"),
    ("mse_per_image", "MSE per image", "{:.2f}"),
    ("mse_per_pixel", "MSE per pixel", "{:.5f}"),
    ("kl_per_image", "KL per image", "{:.2f}"),
    ("attr_acc", "attribute accuracy", "{:.4f}"),
    ("attr_acc_floor", "accuracy floor", "{:.4f}"),
    ("attr_acc_top1", "top-1 accuracy", "{:.4f}"),
    ("attr_acc_floor_top1", "top-1 floor", "{:.4f}"),
    ("control", "control", "{:.3f}"),
    ("diversity", "diversity", "{:.4f}"),
]
OPTIONAL_COLUMNS = {"attr_acc_top1", "attr_acc_floor_top1"}  # left out of the markdown when empty (multi-hot data)


# --- arguments ------------------------------------------------------------------------------------


def parse_betas(value: str) -> list[float]:
    """`[0.25,0.5]` (YAML / OmegaConf list), `0.5` or `0.25,0.5` -> floats in [0, 1] (6 significant
    digits), at least one, no repeats."""
    text = value.strip()
    try:
        parsed = yaml.safe_load(text) if text else None
        if isinstance(parsed, str) and "," in parsed:
            parsed = yaml.safe_load(f"[{parsed}]")
    except yaml.YAMLError:
        cut = text.startswith("[") and "]" not in text  # `betas=[0.5, 0.9]` unquoted: the shell splits it
        raise UserError(
            f"bad value for betas: '{value}' is not a list such as betas=[0.25,0.5,0.75,0.9]"
            + (f"; {SHELL_CUT}" if cut else "")
        ) from None
    values = parsed if isinstance(parsed, list) else [parsed]
    if not values or parsed is None:
        raise UserError("bad value for betas: expected at least one beta, e.g. betas=[0.25,0.5,0.75,0.9]")
    betas, given = [], {}
    for item in values:
        if isinstance(item, str):  # YAML 1.1 reads 1e-3 (no dot) as text; OmegaConf and Python take it as a number
            try:
                item = float(item)
            except ValueError:
                pass
        if isinstance(item, bool) or not isinstance(item, (int, float)) or not 0.0 <= float(item) <= 1.0:
            raise UserError(f"bad value for betas: {item!r} is not a number in [0, 1] (got betas={value})")
        beta = float(f"{float(item):g}")  # 6 significant digits: the folder name beta-<b> holds the exact value
        if beta in given:
            why = (
                f"{beta:g} is given more than once"
                if float(item) == given[beta]
                else f"{given[beta]!r} and {item!r} are the same beta at 6 significant digits ({beta:g})"
            )
            raise UserError(f"bad value for betas: {why} (got betas={value})")
        given[beta] = float(item)
        betas.append(beta)
    return betas


def split_arguments(args: list[str]) -> tuple[list[float], list[str]]:
    """Pop `betas=...` from the key=value arguments (default: the paper's four); the rest go to load_config.
    `beta`, `run_dir` and `resume` are set by the sweep and refused here."""
    betas, rest = None, []
    for previous, arg in zip([None, *args], args):
        key, sep, value = arg.partition("=")
        key = key.strip()
        if not sep and previous is not None and previous.partition("=")[0].strip() == "betas":
            raise UserError(f"bad value for betas: {previous} is followed by '{arg}'; {SHELL_CUT}")
        if sep and key == "betas":
            if betas is not None:
                raise UserError("betas given twice: pass one list, e.g. betas=[0.25,0.5,0.75,0.9]")
            betas = parse_betas(value)
        elif sep and key in SET_BY_SWEEP:
            raise UserError(
                f"{key} is set by the sweep for each run ("
                + {
                    "beta": "use betas=[...]",
                    "run_dir": "use --out DIR",
                    "resume": "finished runs are reused, others resume",
                }[key]
                + f"); drop {arg}"
            )
        else:
            rest.append(arg)
    return (list(PAPER_BETAS) if betas is None else betas), rest


def beta_name(beta: float) -> str:
    return f"beta-{beta:g}"


# --- planning: what each beta needs ---------------------------------------------------------------


@dataclass
class Run:
    beta: float
    run_dir: Path
    config: object  # TrainConfig
    args: list[str]  # what the training process gets
    action: str  # reuse | train | resume
    reason: str = ""
    seconds: float | None = None  # training time in this sweep (None: reused)


def _flatten(node, prefix: str = "") -> dict:
    out = {}
    for key, value in node.items():
        if isinstance(value, dict):
            out.update(_flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def config_differences(run_dir: Path, config) -> dict[str, tuple]:
    """{key: (in RUN/recipe.yaml, in `config`)} for every key that differs, run_dir and resume left out.
    A key the file lacks (an older toolkit) counts as its default."""
    try:
        saved = _flatten(OmegaConf.to_container(OmegaConf.load(run_dir / RECIPE)))
    except Exception as error:
        raise UserError(
            f"{run_dir / 'recipe.yaml'} is not readable: {one_line(error)}; delete {run_dir} to retrain it"
        ) from None
    wanted = _flatten(OmegaConf.to_container(OmegaConf.structured(config)))
    defaults = _flatten(OmegaConf.to_container(OmegaConf.structured(TrainConfig())))
    differ = {}
    for key in sorted(set(saved) | set(wanted)):
        if key in IGNORED_KEYS:
            continue
        old, new = saved.get(key, defaults.get(key)), wanted.get(key)
        if old != new and not (
            isinstance(old, (int, float)) and isinstance(new, (int, float)) and float(old) == float(new)
        ):
            differ[key] = (old, new)
    return differ


def decide(run_dir: Path, config) -> tuple[str, str]:
    """(action, why) for one run folder: reuse a finished run of the same settings, resume an
    interrupted one (or one that only asks for more steps), train a new one; refuse a folder holding
    another experiment, or a run trained on other shards than data.shards holds now."""
    if not (run_dir / RECIPE).is_file():
        return "train", "new run"
    differ = config_differences(run_dir, config)
    other = other_settings(differ)
    if other:
        raise UserError(f"{run_dir} holds a run with other settings ({other}); delete it or sweep into another --out")
    check_trained_shards(run_dir, config.data.shards)
    changed = ", ".join(f"{k}: {old} -> {new}" for k, (old, new) in differ.items())
    if (run_dir / WEIGHTS).is_file() and "max_steps" not in differ:  # logging or workers change no step taken
        return "reuse", "finished, same settings" + (
            f" apart from {changed}, which do not retrain it" if differ else ""
        )
    if not differ:
        return "resume", "interrupted"
    latest = find_checkpoint(run_dir, "latest")
    step = checkpoint_step(latest) if latest else 0
    if step > config.max_steps:
        raise UserError(
            f"{run_dir} already has a checkpoint at step {step}, beyond max_steps={config.max_steps}; "
            f"delete the folder or sweep into another --out"
        )
    return "resume", f"continued from step {step} ({changed})"


def other_settings(differ: dict[str, tuple]) -> str | None:
    """The first few of config_differences' keys that make another experiment, as the refusals name
    them ("lr: 0.001 there, 0.01 now"); None when they differ only in RESUMABLE_KEYS."""
    if set(differ) <= RESUMABLE_KEYS:
        return None
    return "; ".join(f"{k}: {old!r} there, {new!r} now" for k, (old, new) in list(differ.items())[:4])


def check_trained_shards(run_dir: Path, shards: str) -> None:
    """A run trained on other shards than those at `shards` now (rebuilt with other images, sizes or
    attributes) is neither reused nor resumed: its results would be of other data."""
    differs = trained_shards_difference(run_dir, shards)
    if differs is None and (run_dir / WEIGHTS).is_file():  # no checkpoint left to tell: the model's own shape
        spec, manifest = read_spec(run_dir), read_manifest(shards, "train")
        if list(spec.attributes) != list(manifest["attributes"]):
            differs = "other attribute names"
        elif tuple(spec.image_size) != tuple(manifest["image_size"]):
            differs = f"{manifest['image_size'][0]}x{manifest['image_size'][1]} images, the model {spec.image_size[0]}x{spec.image_size[1]}"
    if differs:
        raise UserError(
            f"{run_dir} was trained on other shards than data.shards={shards} holds now ({differs}); "
            f"point data.shards at the shards it was trained on, delete {run_dir} to train it again, or sweep into another --out"
        )


def _earlier_sweep(out: Path) -> bool:
    """A sweep's folder written before the OWNER mark existed: its sweep.json tells."""
    try:
        found = json.loads((out / "sweep.json").read_text())
    except (OSError, ValueError):
        return False
    return isinstance(found, dict) and {"recipe", "betas", "runs"} <= set(found)


def plan(args: list[str], out: str | Path | None = None) -> tuple[list[Run], Path, list[str]]:
    """Validate everything (betas, every override through load_config, the existing run folders) and
    decide each run's action, before anything is written. Returns (runs, out, overrides)."""
    betas, rest = split_arguments(list(args))
    recipe, overrides = parse_overrides(rest)  # rejects arguments that are not key=value
    base = load_config(rest)  # no recipe, unknown keys, bad values: stop here
    recipe_stem = base.recipe
    if base.overwrite:  # each run it trains gets resume=latest, which overwrite=true contradicts
        where = (
            "on the command line" if any(a.partition("=")[0].strip() == "overwrite" for a in rest) else "in the recipe"
        )
        raise UserError(
            f"overwrite=true ({where}) does not apply to a sweep: it reuses finished runs of the same settings and "
            "resumes the others; to train a run again, delete its OUT/beta-<b> folder, or sweep into another --out"
        )
    out = Path(out) if out else Path("runs") / f"sweep-{recipe_stem}"
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} exists and is not a folder")
    check_output(out, folder=True)  # a read-only or full place is refused before hours of training
    runs = []
    for beta in betas:
        run_dir = out / beta_name(beta)
        run_args = [f"recipe={recipe}", *overrides, f"beta={beta:g}", f"run_dir={run_dir}"]
        config = load_config(run_args)
        action, reason = decide(run_dir, config)
        if action != "reuse":  # what its training process would refuse, refused before any beta trains
            claim_run_dir(  # a check only: overwrite is refused above, so nothing is removed
                dataclasses.replace(config, resume="latest", overwrite=False),
                run_dir,
                find_checkpoint(run_dir, "latest"),
                remedy="move away what it holds, or sweep into another --out",
            )
        runs.append(Run(beta, run_dir, config, run_args, action, reason))
    check_one_experiment(out, runs)
    return runs, out, overrides


def check_one_experiment(out: Path, runs: list[Run]) -> None:
    """OUT holds one sweep: the runs of other betas there must have these settings too, or this
    sweep's table and figures would replace those of another experiment (and mix its runs in)."""
    ours = {run.run_dir.name for run in runs}
    for other in sorted(out.glob("beta-*")) if out.is_dir() else []:
        if other.name in ours or not (other / RECIPE).is_file():
            continue
        differ = {k: v for k, v in config_differences(other, runs[0].config).items() if k != "beta"}
        changed = other_settings(differ)
        if changed:
            raise UserError(
                f"--out {out} holds the runs of a sweep with other settings ({other.name}: {changed}): "
                "its table and figures would be replaced by this one's; choose another --out"
            )


# --- training in child processes ------------------------------------------------------------------


def launcher_prefix(launcher: str | None) -> list[str]:
    """The words before `toolkit/train.py`: `python`, or --launcher split as a shell would; a line
    that does not parse, is empty or names a program that is not there is a UserError (before
    anything trains)."""
    if launcher is None:
        return [sys.executable]
    try:
        prefix = shlex.split(launcher)
    except ValueError as error:  # an unmatched quote, a trailing backslash
        raise UserError(f"--launcher {launcher!r} is not a command line: {one_line(error)}") from None
    if not prefix:
        raise UserError(
            '--launcher is empty: give a command such as "accelerate launch --multi_gpu", or leave it out for python'
        )
    beside = Path(sys.executable).parent / prefix[0]  # `accelerate` of this environment when it is not activated
    if "/" not in prefix[0] and shutil.which(prefix[0]) is None and beside.is_file():
        prefix[0] = str(beside)
    if shutil.which(prefix[0]) is None:
        raise UserError(
            f"--launcher {launcher!r}: no program {prefix[0]!r} found (not on PATH, not beside {sys.executable})"
        )
    return prefix


def training_command(run: Run, launcher: str | None) -> list[str]:
    resume = [] if run.action == "reuse" else ["resume=latest"]
    return [*launcher_prefix(launcher), str(TRAIN_SCRIPT), *run.args, *resume]


def _die_with_parent(parent: int):
    """For Popen's preexec_fn: on Linux the child is sent SIGTERM when the sweep dies, also by SIGKILL
    or a scheduler's SIGTERM (no `finally` runs then), so that no training outlives the sweep that
    started it, holding its GPU and its run folder's lock. Elsewhere nothing."""
    if not sys.platform.startswith("linux"):
        return None
    import ctypes

    prctl = ctypes.CDLL(None, use_errno=True).prctl  # looked up before the fork: the child only calls it

    def arm() -> None:
        prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
        if os.getppid() != parent:  # the sweep died before the signal was armed
            os._exit(1)

    return arm


def stream_process(command: list[str], write=None, env: dict | None = None) -> tuple[int, str]:
    """Run `command`, copying its stdout and stderr to ours as they come (progress bars too);
    returns (exit code, the last few KB of its output). `env`: variables set for it besides ours."""
    write = write or (lambda text: (sys.stdout.write(text), sys.stdout.flush()))
    env = dict(os.environ, PYTHONUNBUFFERED="1", **(env or {}))
    try:
        process = subprocess.Popen(
            command,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            env=env,
            bufsize=0,
            preexec_fn=_die_with_parent(os.getpid()),
        )
    except OSError as error:
        raise UserError(f"cannot start {shlex.join(command[:3])}...: {one_line(error)}") from None
    decoder, tail = codecs.getincrementaldecoder("utf-8")("replace"), ""
    try:
        while chunk := os.read(process.stdout.fileno(), 8192):
            text = decoder.decode(chunk)
            write(text)
            tail = (tail + text)[-8000:]
        return process.wait(), tail
    finally:
        if process.poll() is None:  # interrupted
            try:  # Ctrl-C reached the child too: let it stop by itself, releasing its run folder's lock
                process.wait(timeout=STOP_GRACE_S)
            except subprocess.TimeoutExpired:  # a killed child keeps its last complete checkpoint
                process.kill()
                process.wait()
            # what it said while stopping (which checkpoint it left) was not read yet: copy it
            # without waiting for loader workers that may still hold the pipe open
            os.set_blocking(process.stdout.fileno(), False)
            try:
                while chunk := os.read(process.stdout.fileno(), 8192):
                    write(decoder.decode(chunk))
            except OSError:  # BlockingIOError: nothing more now
                pass
        process.stdout.close()


def last_error_line(output: str) -> str:
    lines = [line.strip() for line in output.replace("\r", "\n").splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("error:") or re.match(r"[\w.]*(Error|Exception)\b", line)]
    return (errors or lines or ["no output"])[-1][:500]


def train_runs(runs: list[Run], launcher: str | None, log) -> None:
    for run in runs:
        if run.action == "reuse":
            log(f"sweep: beta={run.beta:g}: reusing {run.run_dir} ({run.reason})")
            continue
        command = training_command(run, launcher)
        log(f"sweep: beta={run.beta:g}: {run.action} ({run.reason}) -> {run.run_dir}")
        log("$ " + shlex.join(command))
        start = time.perf_counter()
        code, output = stream_process(command, env={IN_SWEEP: "1"})  # its advice: run the sweep again
        run.seconds = round(time.perf_counter() - start, 1)
        if code != 0:
            raise UserError(
                f"training beta={run.beta:g} failed (exit code {code}; run folder {run.run_dir}): {last_error_line(output)}; "
                "run the sweep again to resume it (finished runs are reused)"
            )
        log(f"sweep: beta={run.beta:g}: trained in {run.seconds:.0f} s")


# --- evaluation and the table ---------------------------------------------------------------------


def evaluation_matches(report: dict, run_dir: Path, classifier: Path | None, step, shards: str) -> bool:
    """Whether RUN/metrics.json is what evaluate_runs would measure now: the same model, classifier,
    shards (`cvae-tk eval --shards` writes one of other shards; a test split rebuilt since) and settings."""
    path = run_dir / METRICS
    written = path.stat().st_mtime
    judged_after = classifier is None or written >= (Path(classifier) / CLASSIFIER_WEIGHTS).stat().st_mtime
    test_manifest = Path(shards) / "test" / MANIFEST
    measured_after = is_url(shards) or not test_manifest.is_file() or written >= test_manifest.stat().st_mtime
    return (
        written >= (run_dir / WEIGHTS).stat().st_mtime
        and judged_after  # a classifier retrained in the same folder (e.g. with --hflip) judges again
        and measured_after
        and report.get("shards") == str(shards)
        and report.get("settings", {}).get("batch_size") == EVAL_BATCH_SIZE  # it draws the posterior noise
        and report.get("split") == "test"
        and report.get("seed") == 0
        and report.get("step") == step
        and report.get("classifier") == (str(classifier) if classifier else None)
        and report.get("settings", {}).get("diversity_samples") == DIVERSITY_SAMPLES
        and report.get("settings", {}).get("diversity_conditions", 0) <= DIVERSITY_CONDITIONS
        and (classifier is None or "control" in report.get("metrics", {}))  # reports from before the control score
        and (classifier is None or report.get("settings", {}).get("control_conditions", 0) <= CONTROL_CONDITIONS)
        and report.get("shards") is not None
    )


def evaluate_runs(runs: list[Run], classifier: Path | None, device: str, log) -> dict[float, dict]:
    """evaluate_run for each run (its RUN/metrics.json reused when it is newer than the weights and
    was made the same way)."""
    reports = {}
    for run in runs:
        path = run.run_dir / METRICS
        step = (read_spec(run.run_dir).extra or {}).get("step")
        report = None
        if run.action == "reuse" and path.is_file():
            try:
                report = json.loads(path.read_text())
                if not evaluation_matches(report, run.run_dir, classifier, step, run.config.data.shards):
                    report = None
            except (ValueError, OSError):
                report = None
        if report is None:
            log(f"sweep: beta={run.beta:g}: evaluating {run.run_dir} on the test split")
            report = evaluate_run(
                run.run_dir, classifier=classifier, device=device, batch_size=EVAL_BATCH_SIZE, find=False
            )
        else:
            log(f"sweep: beta={run.beta:g}: reusing {path}")
        reports[run.beta] = report
    return reports


def table_rows(reports: dict[float, dict]) -> list[dict]:
    """One row per beta, highest first (as the paper's Table 1)."""
    rows = []
    for beta in sorted(reports, reverse=True):
        metrics = reports[beta]["metrics"]
        rows.append({"beta": beta, **{name: metrics.get(name) for name, _, _ in TABLE_COLUMNS[1:]}})
    return rows


def _cell(value, fmt: str, empty: str) -> str:
    return empty if value is None else fmt.format(value)


def table_csv(rows: list[dict]) -> str:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow([name for name, _, _ in TABLE_COLUMNS])
    for row in rows:
        writer.writerow([_cell(row[name], "{!r}" if name != "beta" else "{:g}", "") for name, _, _ in TABLE_COLUMNS])
    return buffer.getvalue()


def table_markdown(rows: list[dict], caption: str = "") -> str:
    columns = [c for c in TABLE_COLUMNS if c[0] not in OPTIONAL_COLUMNS or any(row[c[0]] is not None for row in rows)]
    lines = [
        "| " + " | ".join(header for _, header, _ in columns) + " |",
        "|" + "|".join("---:" for _ in columns) + "|",
    ]
    for row in rows:
        lines.append("| " + " | ".join(_cell(row[name], fmt, "-") for name, _, fmt in columns) + " |")
    return "\n".join(lines) + "\n" + (f"\n{caption}\n" if caption else "")


def table_caption(runs: list[Run], reports: dict, classifier: Path | None) -> str:
    config = runs[0].config
    report = next(iter(reports.values()))
    metrics = report["metrics"]
    size = "x".join(str(s) for s in json.loads((runs[0].run_dir / CONFIG).read_text())["image_size"])
    text = (
        f"Recipe `{config.recipe}`, {config.max_steps} steps of batch {config.batch_size} per beta (model `{config.model.arch}`, "
        f"latent {config.model.latent_dim}, {config.model.prior} prior); test split of `{report['shards']}`: {metrics['count']} images, {size}. "
        "MSE: squared error summed over the 3 x H x W values of an image, decoded from the posterior mean; per pixel: "
        "divided by 3 x H x W. KL: KL(q(z|x,y) || prior) summed over latent units. Both averaged over the images. "
        f"Diversity: mean pairwise per-pixel RMS distance between {report['settings']['diversity_samples']} prior samples "
        f"of each of the first {report['settings']['diversity_conditions']} test attribute vectors. "
    )
    if classifier is None:
        return (
            text
            + "No attribute classifier was given, so the accuracy columns are empty (`cvae-tk classifier train recipe=NAME`, then `--classifier`)."
        )
    real = metrics.get("attr_acc_real")
    real_top1 = metrics.get("attr_acc_real_top1")
    return text + (
        f"Attribute accuracy: one prior sample per test attribute vector, judged by the classifier `{classifier}` "
        f"(mean over attributes of present/absent agreement; top-1: arg-max = the requested class, one-hot data only); "
        f"floor: the same images against shuffled vectors (a generator that ignores its condition). "
        f"The classifier scores {real:.4f}"
        + (f" (top-1 {real_top1:.4f})" if real_top1 is not None else "")
        + " on the real test images. "
        + control_caption(report)
    )


def control_caption(report: dict) -> str:
    """What the control column means for this table, with the attributes it averages and their scores."""
    control = report.get("control") or {}
    per = control.get("per_attribute") or {}
    reliable = [name for name in control.get("reliable", []) if name in per]
    text = (
        f"Control: per attribute, the first {report['settings'].get('control_conditions')} test vectors generated with it "
        "set to 1 and to 0 (same noise), the classifier's balanced accuracy at telling the two apart (0.5: no control, 1: full), "
    )
    if not reliable:
        return (
            text
            + "averaged over the attributes the classifier recognises reliably on real test images: none here, so the column is empty."
        )
    shown = ", ".join(f"{markdown_text(name)} ({per[name]['real_balanced']:.2f})" for name in reliable)
    return text + (
        f"averaged over the {len(reliable)} attribute(s) the classifier recognises reliably on the real test images "
        f"(balanced accuracy >= {RELIABLE_BALANCED} there, shown in brackets): {shown}. Per attribute: `sweep.json` and each run's metrics.json."
    )


def markdown_text(text: str) -> str:
    """An attribute's name in table1.md as it is spelled: on one line, with the characters Markdown
    acts on escaped (`|` would end a table cell, `*` and `_` emphasise, `<b>` is HTML)."""
    line = printable(str(text))
    return re.sub(r"([\\`*_\[\]<>|#])", r"\\\1", line)


# --- writing --------------------------------------------------------------------------------------


def resolve_classifier(classifier: str | Path | None, out: Path, recipe: str, shards: str) -> Path | None:
    """The classifier to judge the samples with: --classifier, else one evaluate_run would find beside
    the runs (OUT/classifier, OUT/<recipe>-classifier), else None. Checked against the shards now,
    not after hours of training."""
    if classifier is not None:
        classifier = Path(classifier)
        if not classifier.is_dir():
            raise UserError(f"classifier folder not found: {classifier}")
    else:
        classifier = find_classifier(out / "run", recipe)
        if classifier is None:
            return None
    manifest = read_manifest(shards, "test")
    loaded = load_classifier(classifier)
    try:
        columns_for(loaded, list(manifest["attributes"]), f"{shards}")
        check_image_size(loaded, manifest["image_size"], f"{shards}")
    except UserError as error:
        raise UserError(f"classifier {classifier}: {error}") from None
    return classifier


def run_sweep(
    args: list[str],
    out: str | Path | None = None,
    classifier: str | Path | None = None,
    launcher: str | None = None,
    device: str = "auto",
    figure5_beta: float | None = None,
    figure5_attributes: list[str] | None = None,
    log=print,
) -> dict:
    """Train (or reuse) one run per beta, evaluate them, write OUT/{table1.md, table1.csv, figure3.png,
    figure4.png, figure5.png, loss_curves.png, sweep.json}; returns what sweep.json holds."""
    started = time.perf_counter()
    launcher_prefix(launcher)  # an unparsable --launcher stops here too
    runs, out, overrides = plan(args, out)  # argument mistakes stop here, before torch is even imported
    # `cvae-tk sweep ... | head -1`: hours of runs must not end with their log's reader; the training
    # children write into our pipe, never into the closed one, so the notice is ours to give
    when_stdout_closes(f"the sweep goes on: its runs, then table1.md, the figures and sweep.json in {out}")

    config = runs[0].config
    read_manifest(config.data.shards, "train")  # the shards must be there before anything starts
    manifest = read_manifest(config.data.shards, "test")
    device = str(resolve_device(device))
    classifier = resolve_classifier(classifier, out, config.recipe, config.data.shards)
    betas = [run.beta for run in runs]
    edit_beta = max(betas) if figure5_beta is None else float(figure5_beta)
    if edit_beta not in betas:
        raise UserError(f"--figure5-beta {edit_beta:g} is not one of the betas ({', '.join(f'{b:g}' for b in betas)})")
    figure5_attributes = figure5_names(figure5_attributes, list(manifest["attributes"]), config.data.shards)
    with FolderLock(out, "sweep", "--out", "runs, tables and figures"):
        log(
            f"sweep: {config.recipe}, betas {', '.join(f'{b:g}' for b in betas)} -> {out} "
            f"({sum(r.action != 'reuse' for r in runs)} to train, {sum(r.action == 'reuse' for r in runs)} finished); "
            f"classifier: {classifier or 'none'}"
        )
        claim_folder(out, OUTPUTS, OWNER, earlier=_earlier_sweep)  # a user's own table1.md is never replaced
        train_runs(runs, launcher, log)
        reports = evaluate_runs(runs, classifier, device, log)
        rows = table_rows(reports)
        # One set: nothing is renamed until every file is written (sweep.json last), so a failure
        # leaves the earlier sweep's files whole, never a new table beside older figures.
        names = ("sweep.json", *(name for name in OUTPUTS if name != "sweep.json"))
        with atomic_paths(*(out / name for name in names)) as temporaries:
            paths = dict(zip(names, temporaries))
            paths["table1.csv"].write_text(table_csv(rows))
            paths["table1.md"].write_text(table_markdown(rows, table_caption(runs, reports, classifier)))
            figures = draw_figures(runs, paths, config.data.shards, device, edit_beta, figure5_attributes)
            result = {
                "recipe": config.recipe,
                "args": list(args),
                "overrides": overrides,
                "betas": betas,
                "out": str(out),
                "launcher": launcher,
                "classifier": str(classifier) if classifier else None,
                "device": device,
                "runs": [
                    {
                        "beta": r.beta,
                        "run_dir": str(r.run_dir),
                        "action": r.action,
                        "reason": r.reason,
                        "train_seconds": r.seconds,
                        "command": shlex.join(training_command(r, launcher)) if r.action != "reuse" else None,
                        "step": reports[r.beta].get("step"),
                        "metrics": reports[r.beta]["metrics"],
                        "control": reports[r.beta].get("control"),
                    }
                    for r in runs
                ],
                "table": rows,
                "figures": figures,
                "seconds": round(time.perf_counter() - started, 1),
            }
            paths["sweep.json"].write_text(json.dumps(result, indent=2) + "\n")
    log(table_markdown(rows).rstrip())
    log(f"sweep: wrote {', '.join(str(out / name) for name in OUTPUTS)} in {result['seconds']:.0f} s")
    return result


def figure5_names(values: list[str] | str | None, attributes: list[str], shards: str) -> list[str] | None:
    """--figure5-attributes' values -> the attribute names Figure 5 changes (None: its default), each
    once, in the order given. A value that is the name of an attribute is that attribute, whatever it
    holds (class folders may be named 'c,d'); any other is a comma-separated list of names (A,B,C).
    A name matches in either Unicode normalization and is returned as `attributes` spell it.
    Anything that names no attribute is a UserError."""
    if not values:
        return None
    if isinstance(values, str):  # run_sweep(figure5_attributes="Smiling,Male"): one value, not its letters
        values = [values]
    index = attribute_index(attributes)  # a name given in either Unicode normalization: the data's spelling
    names, unknown = [], []
    for value in values:
        parts = (
            [value]
            if attribute_column(index, value) is not None
            else [p.strip() for p in value.split(",") if p.strip()]
        )
        if not parts:
            raise UserError(f"--figure5-attributes {value!r} names no attribute: expected a name, or A,B,C")
        for part in parts:
            column = attribute_column(index, part)
            if column is None:
                unknown.append(part)
            elif attributes[column] not in names:
                names.append(attributes[column])
    if unknown:
        shown = ", ".join(repr(cut(printable(name))) for name in unknown[:5]) + (" ..." if len(unknown) > 5 else "")
        raise UserError(
            f"--figure5-attributes: unknown attribute(s) {shown} in {shards}: expected names of its attributes "
            f"({', '.join(cut(printable(name)) for name in attributes[:8])}{', ...' if len(attributes) > 8 else ''}), "
            "one per value or A,B,C"
        )
    return names


def draw_figures(runs: list[Run], paths: dict, shards: str, device: str, edit_beta: float, edit_attributes) -> dict:
    """Figures 3-5 and the loss curves, written to paths["figure3.png"] ... (the sweep's temporaries)."""
    ordered = sorted(runs, key=lambda r: r.beta, reverse=True)
    models = {f"beta={r.beta:g}": load_model(r.run_dir).to(device).eval() for r in ordered}
    layouts = {}
    image, layouts["figure3"] = figures.samples_figure(models, shards)
    image.save(paths["figure3.png"], format="PNG")
    image, layouts["figure4"] = figures.reconstruction_figure(models, shards)
    image.save(paths["figure4.png"], format="PNG")
    image, layouts["figure5"] = figures.attribute_figure(models[f"beta={edit_beta:g}"], shards, only=edit_attributes)
    layouts["figure5"]["beta"] = edit_beta
    image.save(paths["figure5.png"], format="PNG")
    points = figures.loss_curves(
        {f"beta={r.beta:g}": r.run_dir for r in ordered},
        paths["loss_curves.png"],
        title=f"{runs[0].config.recipe}: training loss per beta",
    )
    layouts["loss_curves"] = {"points": points}
    return layouts
