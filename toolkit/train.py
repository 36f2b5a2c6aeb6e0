"""Train a CVAE from a recipe. Accelerate manages the devices, precision and processes.

    accelerate launch toolkit/train.py recipe=celeba                    # 1..N GPUs, `accelerate config`
    accelerate launch --multi_gpu --num_processes 8 toolkit/train.py recipe=celeba64
    python toolkit/train.py recipe=digits max_steps=500                 # one process, CPU or GPU
    cvae-tk train recipe=digits resume=latest

The run folder (default runs/<recipe>):
    model.safetensors, config.json   final fp32 weights + everything needed to rebuild the model
    recipe.yaml                      the resolved config
    checkpoints/checkpoint-<step>/   accelerate save_state (model, optimizer, scheduler, RNG) + trainer_state.json
    samples.png, samples/            prior samples at fixed conditions and noise; reconstructions of fixed test images
    logs/                            TensorBoard: loss, MSE, KL, lr, images/s, test metrics, grids

Exact resume: the batches are a pure function of (seed, micro-batch index) and the RNG states are
checkpointed, so N steps + resume + N steps gives the weights of 2N steps straight (on the CPU).
"""

from __future__ import annotations

import sys
from pathlib import Path

if __name__ == "__main__":
    if not __package__:
        # `python toolkit/train.py` puts toolkit/ first on sys.path, where its modules would shadow
        # libraries of the same names; put the project root there instead.
        sys.path[0] = str(Path(__file__).resolve().parent.parent)
    from toolkit.entry import begin

    begin()  # before torch's import, which a deleted current folder kills (`accelerate launch` runs this)
    from toolkit.entry import quiet_interrupt

    quiet_interrupt()  # a Ctrl-C during the seconds of torch's import: one line, no traceback

import dataclasses
import errno
import json
import math
import os
import re
import shutil
import time
from datetime import timedelta
from itertools import islice

import torch
from accelerate import Accelerator
from accelerate.utils import (
    InitProcessGroupKwargs,
    ProjectConfiguration,
    broadcast_object_list,
    gather_object,
    set_seed,
)
from accelerate.utils.constants import OPTIMIZER_NAME, RNG_STATE_NAME, SAFE_WEIGHTS_NAME
from torchvision.utils import make_grid
from torchvision.utils import save_image as _save_png
from tqdm.auto import tqdm

import toolkit
from toolkit.atomic import atomic_path, describe_os_error, os_errors, write_text
from toolkit.config import DataConfig, TrainConfig, load_config, to_yaml
from toolkit.data.stream import (
    EpochStream,
    ResampledStream,
    Skips,
    derive_seed,
    eval_batches,
    read_manifest,
    worker_died,
)
from toolkit.devices import check_accelerate_env
from toolkit.entry import (
    BEFORE_THE_RUN,
    INTERRUPTED_EXIT,
    begin,
    resume_advice,
    usual_interrupt,
    when_stdout_closes,
)
from toolkit.errors import UserError, one_line
from toolkit.evaluate import reconstruction_metrics
from toolkit.figures import split_classes
from toolkit.formats import CONFIG, LOGS, RECIPE, RUN_ID, SAMPLES, SAMPLES_GRID, SEEN, WEIGHTS
from toolkit.loss import cvae_loss
from toolkit.memory import available_bytes
from toolkit.model import CVAE, ModelSpec, arch_options, expected_shapes, save_model
from toolkit.run_folder import (  # noqa: F401  (CHECKPOINTS, LOCK, ...: the names tests and callers import from here)
    CHECKPOINTS,
    LOCK,
    RUN_FILES,
    TRAINER_STATE,
    RunLock,
    checkpoint_step,
    claim_run_dir,
    complete_checkpoints,
    find_checkpoint,
    fingerprint_difference,
    read_trainer_state,
    refuse_non_folder,
    run_identity,
    shards_fingerprint,
)
from toolkit.safe_load import safetensors_shapes, verify_checkpoint

GRID_COLUMNS = 8
GRID_ROWS = 8  # test-set conditions shown when there are too many attributes for one row each
GRID_ROWS_ONE_HOT = 16


class TrainingStopped(UserError):
    """Training cannot go on (e.g. the loss stayed non-finite); the last good checkpoint is intact."""


# --- pictures and metrics --------------------------------------------------------------------


def grid_conditions(
    shards: str,
    num_attributes: int,
    max_skipped_fraction: float = DataConfig.max_skipped_fraction,
    manifest: dict | None = None,
) -> torch.Tensor:
    """Rows of the sample grids: with few attributes (digits' classes) each one alone; one-hot data
    with many classes (CUB's species) the first GRID_ROWS classes of the test split, each alone;
    else (CelebA, CUB's attributes) the attribute vectors of the first test images, which are real
    combinations. `manifest`: the test split's, if read already."""
    if num_attributes <= GRID_ROWS_ONE_HOT:
        return torch.eye(num_attributes)
    classes = split_classes(
        shards, num_attributes, GRID_ROWS, max_skipped_fraction=max_skipped_fraction, manifest=manifest
    )
    if classes is not None:
        return torch.eye(num_attributes)[classes]
    _, attributes = next(iter(eval_batches(shards, "test", GRID_ROWS, max_skipped_fraction, manifest=manifest)))
    return attributes


@torch.no_grad()
def save_grid(grid: torch.Tensor, path: Path) -> None:
    """A [3, H, W] grid in [0, 1] as a PNG, atomically (never a partial PNG under the final name)."""
    with atomic_path(path) as tmp:
        _save_png(grid, tmp, format="png")


def sample_grid(model: CVAE, attributes: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """One row per attribute vector, GRID_COLUMNS noise vectors per row -> a [3, H', W'] grid."""
    rows = attributes.repeat_interleave(GRID_COLUMNS, dim=0)
    images = model.generate(rows, noise).float().clamp(0, 1)
    return make_grid(images.cpu(), nrow=GRID_COLUMNS, padding=2, pad_value=1.0)


@torch.no_grad()
def reconstruction_grid(model: CVAE, images: torch.Tensor, attributes: torch.Tensor) -> torch.Tensor:
    """Fixed test images (top row) and their reconstructions from the posterior mean (bottom row)."""
    mu, _ = model.encoder(images, attributes)
    recon = model.decoder(mu, attributes).float().clamp(0, 1)
    return make_grid(torch.cat([images.float(), recon]).cpu(), nrow=len(images), padding=2, pad_value=1.0)


@torch.no_grad()
def heldout_metrics(
    model: CVAE,
    shards: str,
    device: torch.device,
    split: str = "test",
    max_skipped_fraction: float = DataConfig.max_skipped_fraction,
) -> dict[str, float]:
    """Reconstruction MSE (summed per image, and per pixel) and KL per image on a split, from the posterior mean."""
    result = reconstruction_metrics(
        model, shards, split, device, sampled=False, max_skipped_fraction=max_skipped_fraction
    )
    return {f"{split}/{key}": result[key] for key in ("mse_per_image", "mse_per_pixel", "kl_per_image")}


# --- batches: a pure function of (seed, micro-batch index) -----------------------------------


class BatchStream:
    """This rank's micro-batches as a sequence of segments, each rebuilt from the seed alone.

    sampling=epochs: segment k is epoch k (`EpochStream`: disjoint across ranks, the same length
    on every rank). sampling=resampled: segment k is SEGMENT batches of the stream seeded with
    (seed, k) (`ResampledStream`). Either reader starts its loader workers once, for all segments.
    Starting at any micro-batch index opens its segment and skips to it, so a
    resumed run sees exactly the batches an uninterrupted run would have seen. `device`: where the
    batches land (the readers copy and convert them there).
    """

    SEGMENT = 1000

    def __init__(
        self,
        config: TrainConfig,
        rank: int,
        world: int,
        manifest: dict | None = None,
        device: torch.device | None = None,
    ):
        self.config, self.rank, self.world, self.device = config, rank, world, device
        self.data = data = config.data
        # the train split's manifest, read once for every segment (given by the trainer, which has read it)
        manifest = manifest or read_manifest(data.shards, "train")
        shards, self.train_count = len(manifest["shards"]), manifest["count"]
        if data.sampling == "epochs" and data.num_workers > max(shards // world, 1):
            # shards are dealt to ranks, then workers: the extra ones would start, read nothing and hold memory
            raise UserError(
                f"data.num_workers={data.num_workers}, but {data.shards} has {shards} train shard(s) for "
                f"{world} rank(s): at most {max(shards // world, 1)} worker(s) per rank get a shard to read; "
                "lower data.num_workers, rebuild with a smaller --shard-size, or use data.sampling=resampled"
            )
        # unreadable samples of all segments; checked by the loop, summed over the ranks (`skipped`)
        self.skips = Skips("train", data.shards, self.train_count, data.max_skipped_fraction, check=False)
        # this rank's counts that a run resuming after the batch last yielded starts from (`batches`)
        self.resume_counts = skip_counts(self.skips)
        # one reader for every segment: its loader workers are started once (at the first read)
        self.reader = (
            ResampledStream(
                data.shards,
                config.batch_size,
                data.num_workers,
                data.shuffle_buffer,
                data.record_keys,
                skips=self.skips,
                manifest=manifest,
                device=device,
                seed=config.seed,
            )
            if data.sampling == "resampled"
            else EpochStream(
                data.shards,
                "train",
                config.batch_size,
                seed=config.seed,
                rank=rank,
                world=world,
                num_workers=data.num_workers,
                shuffle_buffer=data.shuffle_buffer,
                with_keys=data.record_keys,
                skips=self.skips,
                manifest=manifest,
                device=device,
            )
        )
        if self.length(0) == 0:  # say it now, before any step
            workers = max(data.num_workers, 1)
            if data.sampling == "epochs" and shards < world * workers:
                raise UserError(
                    f"{data.shards} has {shards} train shard(s) for {world} rank(s) x {workers} worker(s): "
                    "rebuild with a smaller --shard-size, or use data.sampling=resampled"
                )
            # each rank, and each loader worker in it, fills its own batches from its own shards
            parts = [f"{world} processes"] * (world > 1) + [f"{workers} loader workers"] * (workers > 1)
            raise UserError(
                f"{data.shards} train split ({self.train_count} samples) cannot fill one batch of {config.batch_size}"
                + (f" in each of {' x '.join(parts)}" if parts else "")
                + "; lower batch_size"
                + (" or data.num_workers" if workers > 1 else "")
                + (" or the number of processes" if world > 1 else "")
            )

    def length(self, segment: int) -> int:
        return self.SEGMENT if self.data.sampling == "resampled" else self.reader.length(segment)

    def _segment(self, segment: int):
        if self.data.sampling == "resampled":
            return islice(self.reader.batches(derive_seed(self.config.seed, segment)), self.SEGMENT)
        return self.reader.epoch(segment)

    def close(self) -> None:
        """Stop the loader workers now (they outlive each segment; a later read starts new ones)."""
        self.reader.close()

    def batches(self, start: int):
        """Yield (segment, last of its segment, batch) from micro-batch index `start` on, forever.

        Keeps `resume_counts`: the skip counts a run resumed after the batch last yielded starts
        from. A resume inside a segment reads it again from its start (counting its skips again),
        so these are the counts at the segment's start; after its last batch, the counts then."""
        segment, offset = 0, start
        while offset >= self.length(segment):
            offset -= self.length(segment)
            segment += 1
        while True:
            length = self.length(segment)
            self.resume_counts = skip_counts(self.skips)
            for index, batch in enumerate(self._segment(segment)):
                if index >= offset:
                    if index == length - 1:
                        self.resume_counts = skip_counts(self.skips)
                    yield segment, index == length - 1, batch
            segment, offset = segment + 1, 0


# --- skipped samples across resumes ---------------------------------------------------------------

SKIP_COUNTS = ("samples_read", "lost_in_shards", "undecodable")  # the Skips counters a checkpoint keeps


def skip_counts(skips: Skips) -> dict:
    """One rank's skip counts as trainer_state.json records them (plain JSON)."""
    return {
        **{key: int(getattr(skips, key)) for key in SKIP_COUNTS},
        "by_shard": {url: [int(lost), str(reason)] for url, (lost, reason) in skips.by_shard.items()},
    }


def saved_skips(state: dict, path: Path) -> list[dict]:
    """The `skips` record of a checkpoint's trainer_state.json (`state`): one entry per rank of the
    run that saved it, checked; [] for an older checkpoint, which has none (its run starts at zero)."""
    saved = state.get("skips", [])

    def count(value) -> bool:
        return type(value) is int and value >= 0

    if not isinstance(saved, list) or not all(
        isinstance(entry, dict)
        and all(count(entry.get(key)) for key in SKIP_COUNTS)
        and isinstance(entry.get("by_shard"), dict)
        and all(
            isinstance(v, list) and len(v) == 2 and count(v[0]) and isinstance(v[1], str)
            for v in entry["by_shard"].values()
        )
        for entry in saved
    ):
        raise UserError(
            f"{path / TRAINER_STATE}: its 'skips' record is not one that a save writes (a list of each rank's "
            "counts of skipped samples); resume another checkpoint, or delete the record to count from zero"
        )
    return saved


def restore_skips(skips: Skips, saved: list[dict], rank: int, world: int) -> None:
    """Add rank `rank`'s share of a checkpoint's `saved` counts (`saved_skips`) to `skips`: its own
    entry when as many ranks saved as run now; else rank 0 takes them all (the bound and the log
    use the sums over the ranks, which stay the same)."""
    entries = [saved[rank]] if len(saved) == world else saved if rank == 0 else []
    for entry in entries:
        for key in SKIP_COUNTS:
            setattr(skips, key, getattr(skips, key) + entry[key])
        for url, (lost, reason) in entry["by_shard"].items():
            skips.by_shard.setdefault(url, [0, reason])[0] += lost


# --- checkpoints -----------------------------------------------------------------------------


def _data_order(config: TrainConfig, world: int) -> dict:
    """What a resumed run must share with the checkpoint's run to continue exactly as it would have
    (the batches are a function of these; see BatchStream)."""
    return {
        "seed": config.seed,
        "batch_size": config.batch_size,
        "grad_accum": config.grad_accum,
        "processes": world,
        "sampling": config.data.sampling,
        "num_workers": config.data.num_workers,
    }


def save_checkpoint(
    accelerator: Accelerator,
    run_dir: Path,
    step: int,
    spec: ModelSpec,
    limit: int,
    data_order: dict | None = None,
    shards: dict | None = None,
    run_id: str | None = None,
    skips: dict | None = None,
) -> Path:
    """save_state into checkpoint-<step>.tmp, mark it complete, then rename: a save cut short never
    replaces (or looks like) a good checkpoint. Keeps the newest `limit`. `run_id`: the run's
    identity (run_folder.run_identity), which a resume of it keeps. `skips`: this rank's skip
    counts to resume from (`BatchStream.resume_counts`), recorded for every rank."""
    skips_by_rank = gather_object([skips]) if skips is not None else None  # a collective: on every rank
    folder = run_dir / CHECKPOINTS
    final, partial = folder / f"checkpoint-{step}", folder / f"checkpoint-{step}.tmp"
    if accelerator.is_main_process:
        shutil.rmtree(partial, ignore_errors=True)
    accelerator.wait_for_everyone()
    failure = None
    try:
        with os_errors(partial):  # safetensors and torch.save report a full disk in their own exceptions
            accelerator.save_state(str(partial))
    except OSError as error:  # e.g. a full disk: say so in one line, and which checkpoint is still good
        failure = error
    _stop_together(accelerator, run_dir, partial, failure)
    if accelerator.is_main_process:
        state = {
            "step": step,
            "model": _identity(spec),
            "data_order": data_order or {},
            "shards": shards or {},
            "toolkit_version": toolkit.__version__,
            **({RUN_ID: run_id} if run_id else {}),
            **({"skips": skips_by_rank} if skips_by_rank is not None else {}),
        }
        try:
            (partial / TRAINER_STATE).write_text(json.dumps(state, indent=2) + "\n")
            shutil.rmtree(final, ignore_errors=True)
            os.replace(partial, final)
        except OSError as error:
            failure = error
        else:
            for old in complete_checkpoints(run_dir)[:-limit]:
                shutil.rmtree(old, ignore_errors=True)
    _stop_together(accelerator, run_dir, partial, failure)
    return final


def _stop_together(accelerator: Accelerator, run_dir: Path, partial: Path, failure: OSError | None) -> None:
    """The barrier of a save, which is also where the processes learn whether every one of them wrote
    its part: if one could not (its disk filled), they all stop with a line, instead of the others
    waiting at the next barrier until the launcher or dist_timeout_s stops them."""
    failed = gather_object([failure is not None]) if accelerator.num_processes > 1 else [failure is not None]
    if failure is not None:
        raise _save_failed(run_dir, partial, failure, accelerator.is_main_process) from failure
    if any(failed):
        ranks = ", ".join(str(rank) for rank, failed_there in enumerate(failed) if failed_there)
        raise _save_failed(
            run_dir, partial, None, accelerator.is_main_process, f"process {ranks} failed (its line says why)"
        )


def _save_failed(
    run_dir: Path, partial: Path, error: OSError | None, remove: bool, elsewhere: str | None = None
) -> TrainingStopped:
    if remove:  # the part written would only hold the space a full disk lacks
        shutil.rmtree(partial, ignore_errors=True)
    last = find_checkpoint(run_dir, "latest")
    if error is None:
        why = elsewhere
    else:
        code = errno.errorcode.get(error.errno, "") if error.errno else ""
        why = f"{error.strerror or error}{f' ({code})' if code else ''}"
    return TrainingStopped(
        f"could not write the checkpoint {partial}: {why}; "
        + (f"the last complete checkpoint is {last}, " if last else "there is no complete checkpoint yet, ")
        + "free some space (or lower checkpoints_total_limit) and "
        + resume_advice("run again with resume=latest")
    )


def _identity(spec: ModelSpec) -> dict:
    """What a checkpoint's model must share with the run that resumes it."""
    return {
        "attributes": list(spec.attributes),
        "image_size": list(spec.image_size),
        "arch": spec.arch,
        "latent_dim": spec.latent_dim,
        "prior": spec.prior,
        "options": dict(spec.options),
    }


def _check_resume(
    path: Path, spec: ModelSpec, data_order: dict, warn: bool = True, shards: dict | None = None, where: str = ""
) -> list[dict]:
    """Refuse a checkpoint that cannot continue this run (another model or other shards, a record or
    a file that is not what a save wrote) before anything is loaded; warn of another data order.
    Returns its skip counts (`saved_skips`), which the trainer restores once its reader is set up."""
    state = read_trainer_state(path)
    skips = saved_skips(state, path)
    saved = state.get("model", {})
    for key, now in _identity(spec).items():
        if key in saved and saved[key] != now:
            raise UserError(
                f"cannot resume from {path}: its model has {key}={saved[key]!r}, the recipe and shards give {now!r}"
            )
    missing = _missing_files(path, state)
    if (
        missing
    ):  # Accelerate named another file (pytorch_model.bin) for the weights, and skipped the RNG states silently
        raise UserError(
            f"cannot resume from {path}: it lacks {', '.join(missing)}, which every save writes (a checkpoint copied "
            "or synced in part?); restore the checkpoint whole, or resume another one"
        )
    _check_checkpoint_weights(path, spec)
    verify_checkpoint(path)  # accelerate unpickles custom_checkpoint_*.pkl: only files that load as plain data
    found = fingerprint_difference(state.get("shards", {}), shards or {})  # older checkpoints record none
    if found:
        raise UserError(
            f"cannot resume from {path}: the {found[0]} split of data.shards={where} is not the one it was trained on ({found[1]}); "
            "point data.shards at those shards (a rebuild with the same input and options gives them again), or start a new run"
        )
    # Another batch size, seed or process count is a legitimate choice (a bigger machine), but the
    # run then no longer continues as the interrupted one would have: say so, once.
    recorded = state.get("data_order", {})
    changed = [
        f"{key}={now!r} (was {recorded[key]!r})" for key, now in data_order.items() if recorded.get(key, now) != now
    ]
    if changed and warn:
        tqdm.write(
            f"warning: resuming from {path} with {', '.join(changed)}: training goes on, but the data order "
            "differs from the run that wrote the checkpoint, so it will not match an uninterrupted run",
            file=sys.stderr,
        )
    return skips


def _missing_files(path: Path, state: dict) -> list[str]:
    """The files that save_checkpoint's save_state writes into every checkpoint (the weights, the
    optimizer, the LR schedule, the RNG states of each process of the run that saved it) and that
    `path` lacks. Without the RNG states Accelerate resumes anyway, so the run silently no longer
    continues as the interrupted one would have."""
    processes = state.get("data_order", {}).get("processes")
    count = processes if type(processes) is int and 1 <= processes <= 1 << 16 else 1
    needed = [
        SAFE_WEIGHTS_NAME,
        f"{OPTIMIZER_NAME}.bin",
        "custom_checkpoint_0.pkl",  # the LR scheduler (register_for_checkpointing)
        *(f"{RNG_STATE_NAME}_{rank}.pkl" for rank in range(count)),
    ]
    return [name for name in needed if not (path / name).is_file()]


def _check_checkpoint_weights(path: Path, spec: ModelSpec) -> None:
    """The checkpoint's weights have this model's tensors: a checkpoint without the `model` record
    (older, or edited) of another latent size or attribute count was a size-mismatch traceback."""
    weights = path / WEIGHTS  # what save_state writes for our one model
    if not weights.is_file():
        return  # Accelerate's load_state names what is missing
    try:
        found = safetensors_shapes(weights)
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise UserError(f"{weights} is not a readable safetensors weights file: {one_line(error)}") from None
    expected = expected_shapes(spec)
    if expected is not None and found != expected:
        name = sorted(set(expected) ^ set(found) or {n for n in expected if expected[n] != found[n]})[0]
        there, now = (list(shapes[name]) if name in shapes else "none" for shapes in (found, expected))
        raise UserError(
            f"cannot resume from {path}: its weights are of another model ({name}: {there} there, {now} now); "
            "resume a checkpoint of this model (the same model.*, attributes and image size), or start a new run"
        )


def _older_checkpoint(run_dir: Path, refused: Path, check) -> str:
    """'; <older checkpoint> passes these checks: ...' for the newest checkpoint older than `refused`
    that `check` (a function of a path that raises UserError) accepts, or ''."""
    for older in reversed(complete_checkpoints(run_dir)):
        if checkpoint_step(older) >= checkpoint_step(refused):
            continue
        try:
            check(older)
        except UserError:
            continue
        return (
            f"; the previous checkpoint {older} passes these checks: continue from it with resume={older} "
            f"(the steps after it are trained again), or delete {refused.name}"
        )
    return ""


# --- what the machine can do ---------------------------------------------------------------------


def _fmt_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB", "PB"):
        if n < 1024 or unit == "PB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return f"{n:.1f} PB"


def memory_estimate(spec: ModelSpec, batch_size: int, prior_sample: bool) -> dict:
    """Bytes a training step needs, from the model built on the meta device (nothing allocated):
    weights, gradients and Adam's two moments (16 bytes per parameter), and the outputs of every
    layer for one batch, kept for the backward pass, with their gradients (2 x 4 bytes per value).
    A lower bound: what the functional ops in between take is not counted."""
    values = [0]

    def count(module, inputs, output):
        outputs = output if isinstance(output, tuple) else (output,)
        values[0] += sum(t.numel() for t in outputs if isinstance(t, torch.Tensor))

    with torch.device("meta"):
        model = CVAE(spec)
        hooks = [m.register_forward_hook(count) for m in model.modules() if not list(m.children())]
        model(
            torch.empty(batch_size, 3, *spec.image_size),
            torch.empty(batch_size, spec.num_attributes),
            prior_sample=prior_sample,
        )
    for hook in hooks:
        hook.remove()
    largest = max(model.named_parameters(), key=lambda item: item[1].numel())
    parameters = sum(p.numel() for p in model.parameters())
    return {
        "parameters": parameters,
        "weights": 16 * parameters,
        "activations": 8 * values[0],
        "largest": (largest[0], largest[1].numel()),
    }


def available_memory(device: torch.device) -> int | None:
    """Free memory on the device: the GPU's, or what this process may still take (toolkit.memory:
    the machine's, capped by a container's limit); None where it cannot be told."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    return available_bytes()


def check_memory(config: TrainConfig, spec: ModelSpec, device: torch.device) -> None:
    """Refuse, before anything is allocated, a model or batch that cannot fit (latent_dim=10**9,
    model.width=10**5, a huge batch of large images): one line instead of an allocator's traceback."""
    keys = "model.latent_dim" + (", model.width, model.levels, model.embed_dim" if spec.arch == "resnet" else "")
    try:
        need = memory_estimate(spec, config.batch_size, config.gsnn_weight > 0)
    except RuntimeError as error:  # "Storage size calculation overflowed": no machine holds it
        if "overflow" not in str(error):
            raise
        raise UserError(
            f"this model and batch are beyond what a tensor can hold ({one_line(error)}); lower {keys} or batch_size"
        ) from None
    have = available_memory(device)
    total = need["weights"] + need["activations"]
    if have is None or total <= have:
        return
    raise UserError(
        f"this model and batch need about {_fmt_bytes(total)}, more than the {_fmt_bytes(have)} available on {device}: "
        f"{need['parameters']:,} parameters ({_fmt_bytes(need['weights'])} with gradients and Adam's state; the largest, "
        f"{need['largest'][0]}, has {need['largest'][1]:,}) and about {_fmt_bytes(need['activations'])} of activations for a batch "
        f"of {config.batch_size} at {spec.image_size[0]}x{spec.image_size[1]}; lower {keys} or batch_size"
    )


# What a collective raises on a rank whose peer went away: gloo's socket closed or reset (the peer's
# process ended), NCCL's remote error, a timeout waiting for a frozen peer (dist_timeout_s), or
# torch's network and store errors (the rendezvous store's host gone). Not NCCL's errors in general:
# a CUDA fault of this rank is this rank's.
_PEER_LOST = (
    "Connection closed by peer",
    "Connection reset by peer",
    "Broken pipe",
    "remote process exited",
    "Timed out",
)


def peer_lost(error: BaseException) -> bool:
    network_errors = tuple(
        getattr(torch.distributed, name)
        for name in ("DistNetworkError", "DistStoreError")
        if hasattr(torch.distributed, name)
    )
    return isinstance(error, network_errors) or (
        isinstance(error, RuntimeError) and any(words in str(error) for words in _PEER_LOST)
    )


def _on_main(accelerator: Accelerator, action) -> None:
    """Run `action` on the main process only; a UserError it raises is raised on every rank, so a
    refusal stops them all at once instead of leaving the others waiting at a collective."""
    message = None
    if accelerator.is_main_process:
        try:
            action()
        except UserError as error:
            message = one_line(error)
    if accelerator.num_processes > 1:
        message = broadcast_object_list([message])[0]
    if message is not None:
        raise UserError(message)


def _schedule(config: TrainConfig):
    def factor(step: int) -> float:
        if step < config.warmup_steps:
            return (step + 1) / config.warmup_steps
        if config.lr_schedule == "cosine":
            progress = (step - config.warmup_steps) / max(1, config.max_steps - config.warmup_steps)
            return 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))
        return 1.0

    return factor


# --- the loop ----------------------------------------------------------------------------------


def train(config: TrainConfig) -> Path:
    run_dir = Path(config.run_dir)
    when_stdout_closes(f"training goes on: TensorBoard logs in {run_dir / LOGS}, the results in {run_dir}")
    check_accelerate_env(config.grad_accum)
    try:
        accelerator = Accelerator(
            mixed_precision=None if config.mixed_precision == "auto" else config.mixed_precision,
            gradient_accumulation_steps=config.grad_accum,
            log_with="tensorboard",
            project_config=ProjectConfiguration(project_dir=str(run_dir), logging_dir=str(run_dir / LOGS)),
            # a collective that waits longer than this (a rank frozen or its machine gone) fails instead of hanging
            kwargs_handlers=[InitProcessGroupKwargs(timeout=timedelta(seconds=config.dist_timeout_s))],
        )
    except ValueError as error:  # e.g. bf16 on a GPU without it, or fp8 without its library
        # with auto, the precision (and whatever failed) comes from `accelerate launch` or its config
        where = f"mixed_precision={config.mixed_precision}" if config.mixed_precision != "auto" else "Accelerate"
        raise UserError(f"{where}: {one_line(error)}") from None
    _check_precision(config, accelerator)
    refuse_non_folder(run_dir)  # a file, a link to nothing: the folder cannot be made there
    lock = RunLock(run_dir)
    created = not run_dir.exists()

    def take() -> None:
        try:
            run_dir.mkdir(parents=True, exist_ok=True)
        except OSError as error:
            raise UserError(f"cannot create run_dir={run_dir}: {error.strerror or error}") from None
        lock.acquire()

    _on_main(accelerator, take)  # only the main process writes the folder (it may be shared by machines)
    try:
        trainer = Trainer(config, accelerator, run_dir)
        trainer.setup()
        trainer.train()
        return trainer.finish()
    except BaseException:
        # A stop of a multi-process run: end the process group now, in order. Left to the interpreter's
        # exit, its threads were sometimes destroyed unjoined: 'terminate called without an active
        # exception', SIGABRT, after the stop's own line.
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
        raise
    finally:
        lock.release()
        if accelerator.is_main_process and created and run_dir.is_dir() and not any(run_dir.iterdir()):
            run_dir.rmdir()  # refused before anything was written: leave no empty folder behind


def effective_precision(accelerator: Accelerator) -> str:
    """The precision the steps run in: Accelerate keeps reporting fp16 where it runs fp32 (a CPU)."""
    return (
        "no" if accelerator.mixed_precision == "fp16" and not accelerator.native_amp else accelerator.mixed_precision
    )


def _check_precision(config: TrainConfig, accelerator: Accelerator) -> None:
    """Accelerate quietly runs fp32 where it cannot autocast to fp16 (on a CPU): refuse the setting
    that would do nothing, or say it once when it came from `accelerate launch` / its config."""
    if effective_precision(accelerator) == accelerator.mixed_precision:
        return
    message = (
        f"mixed_precision=fp16 does nothing on {accelerator.device.type}: Accelerate runs fp32 there "
        "(fp16 needs a GPU); use mixed_precision=no, or bf16, which the CPU runs"
    )
    if config.mixed_precision == "fp16":
        raise UserError(message)
    if accelerator.is_main_process:
        tqdm.write(
            f"warning: {message.replace('mixed_precision=fp16', 'fp16 (from accelerate launch or its config)', 1)}",
            file=sys.stderr,
        )


def _check_splits(shards: str) -> dict[str, dict]:
    """{"train": manifest, "test": manifest}, once the train images have one size and the test
    split matches it (the test split feeds grids and metrics: fail now, not after training). Read
    once: the rest of the set-up takes them from here."""
    manifest = read_manifest(shards, "train")
    if not manifest.get("image_size") or 0 in manifest["image_size"]:
        raise UserError(f"{shards}: the images have varied sizes; rebuild the shards with --size N or HxW")
    test = read_manifest(shards, "test")
    for key, what in (("image_size", "image size"), ("attributes", "attributes")):
        if test.get(key) != manifest[key]:
            show = (
                (lambda v: "x".join(map(str, v)) if v else repr(v))
                if key == "image_size"
                else (lambda v: f"{len(v)} ({', '.join(v[:3])}, ...)" if isinstance(v, list) else repr(v))
            )
            raise UserError(
                f"{shards}: the test split's {what} ({show(test.get(key))}) differ from the train split's ({show(manifest[key])}); "
                "rebuild both splits in one `cvae-tk shards` run"
            )
    return {"train": manifest, "test": test}


class Trainer:
    """One training run in torchtune's shape: `setup()` (shards, model, optimizer, resume, run
    folder), `train()` (the loop; `step()` is one micro-batch), `finish()` (final metrics, weights,
    grid). `train(config)` below runs the three inside the run folder's lock."""

    def __init__(self, config: TrainConfig, accelerator: Accelerator, run_dir: Path):
        self.config, self.accelerator, self.run_dir = config, accelerator, run_dir

    # --- setup -------------------------------------------------------------------------------------

    def setup(self) -> None:
        config, accelerator, run_dir = self.config, self.accelerator, self.run_dir
        set_seed(config.seed)
        self.manifests = _check_splits(config.data.shards)
        manifest = self.manifests["train"]
        self.spec = spec = ModelSpec(
            attributes=manifest["attributes"],
            image_size=tuple(manifest["image_size"]),
            latent_dim=config.model.latent_dim,
            arch=config.model.arch,
            prior=config.model.prior,
            options=arch_options(config.model.arch, config.model),
        )
        self.resume_from = find_checkpoint(run_dir, config.resume)
        self.data_order = _data_order(config, accelerator.num_processes)
        self.fingerprint = shards_fingerprint(config.data.shards, self.manifests)
        skipped_before = []
        if self.resume_from is not None:  # on every rank: a refusal must stop them all
            skipped_before = self._check_resume(self.resume_from)
        self.run_id = run_identity(run_dir, self.resume_from)  # the main process's is the one written
        _on_main(accelerator, lambda: claim_run_dir(config, run_dir, self.resume_from))
        self.stream = BatchStream(
            config, accelerator.process_index, accelerator.num_processes, self.manifests["train"], accelerator.device
        )
        # what the run skipped before: the bound and the log go on from it
        restore_skips(self.stream.skips, skipped_before, accelerator.process_index, accelerator.num_processes)
        check_memory(config, spec, accelerator.device)
        self._setup_model()
        self._setup_grids()
        self.steps_per_epoch = max(
            1, self.stream.train_count // (config.batch_size * accelerator.num_processes * config.grad_accum)
        )
        if accelerator.is_main_process:
            run_dir.mkdir(parents=True, exist_ok=True)
            # the sweep compares it: never half-written; overwrite is an action on the folder, not a setting of the run
            write_text(run_dir / RECIPE, to_yaml(dataclasses.replace(config, overwrite=False)))
            accelerator.init_trackers(
                "cvae", config={"beta": config.beta, "lr": config.lr, "batch_size": config.batch_size}
            )
            print(
                f"training {spec.arch} CVAE ({spec.prior} prior) on {config.data.shards} ({self.stream.train_count} train images, "
                f"{spec.image_size[0]}x{spec.image_size[1]}, {spec.num_attributes} attributes) on {accelerator.device}, "
                f"precision {effective_precision(accelerator)}, {accelerator.num_processes} process(es)"
                + (f"; resuming from {self.resume_from} (step {self.start_step})" if self.resume_from else "")
                # say it: a mistyped run_dir would otherwise start afresh without a word
                + (f"; resume=latest: no checkpoint in {run_dir / CHECKPOINTS} yet, starting at step 0"
                   if config.resume == "latest" and not self.resume_from else "")
            )  # fmt: skip
        self.seen_file = None
        if config.data.record_keys:
            (run_dir / SEEN).mkdir(parents=True, exist_ok=True)
            self.seen_file = open(run_dir / SEEN / f"rank-{accelerator.process_index}.txt", "a")

    def _check_resume(self, path: Path) -> list[dict]:
        """_check_resume for this run; when resume=latest picked a checkpoint that fails, the line
        also names an older one that passes (a checkpoint damaged since it was saved)."""
        config, step = self.config, checkpoint_step(path)
        if step > config.max_steps:  # it finished at once, writing a model of more steps than asked
            raise UserError(
                f"cannot resume from {path}: it is at step {step}, beyond max_steps={config.max_steps}; "
                f"raise max_steps to {step} or more, or resume an earlier checkpoint"
            )

        def check(checkpoint: Path, warn: bool = False) -> list[dict]:
            return _check_resume(checkpoint, self.spec, self.data_order, warn, self.fingerprint, config.data.shards)

        try:
            return check(path, warn=self.accelerator.is_main_process)
        except UserError as error:
            if config.resume != "latest":
                raise
            raise UserError(f"{error}{_older_checkpoint(self.run_dir, path, check)}") from None

    def _setup_model(self) -> None:
        """Model, optimizer and LR schedule, prepared by Accelerate; the checkpoint's state if resuming."""
        config, accelerator = self.config, self.accelerator
        model = CVAE(self.spec)
        optimizer_class = torch.optim.AdamW if config.optimizer == "adamw" else torch.optim.Adam
        optimizer = optimizer_class(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _schedule(config))
        self.model, self.optimizer = accelerator.prepare(model, optimizer)
        # The scheduler is stepped once per optimizer step by this loop, and checkpointed with the rest.
        accelerator.register_for_checkpointing(self.scheduler)
        self.start_step = 0
        if self.resume_from is not None:  # checked by _check_resume: its files are plain data, its model this one
            accelerator.load_state(str(self.resume_from))
            self.start_step = checkpoint_step(self.resume_from)

    def _setup_grids(self) -> None:
        """Fixed conditions, noise and test images for every grid, so grids are comparable across steps."""
        config, device = self.config, self.accelerator.device
        self.grid_attributes = grid_conditions(
            config.data.shards, self.spec.num_attributes, config.data.max_skipped_fraction, self.manifests["test"]
        ).to(device)
        self.grid_noise = torch.randn(
            len(self.grid_attributes) * GRID_COLUMNS,
            self.spec.latent_dim,
            generator=torch.Generator().manual_seed(config.seed),
        ).to(device)
        self.fixed_images, self.fixed_attributes = (
            t[:GRID_COLUMNS].to(device)
            for t in next(
                iter(
                    eval_batches(
                        config.data.shards,
                        "test",
                        GRID_COLUMNS,
                        config.data.max_skipped_fraction,
                        manifest=self.manifests["test"],
                    )
                )
            )
        )

    # --- the loop ----------------------------------------------------------------------------------

    def step(self, images: torch.Tensor, attributes: torch.Tensor):
        """One micro-batch: forward, loss, backward, clip, optimizer step, zero, when the loss is
        finite on every rank (else none of them steps). Returns (loss terms, skipped and read train
        samples summed over the ranks)."""
        config, accelerator, model, optimizer = self.config, self.accelerator, self.model, self.optimizer
        with accelerator.accumulate(model):
            out = model(images, attributes, prior_sample=config.gsnn_weight > 0)
            terms = cvae_loss(
                out.recon, images, out.mu, out.logvar, config.beta,
                out.prior_mu, out.prior_logvar, out.prior_recon, config.gsnn_weight,
            )  # fmt: skip
            finite, skipped, read = self._agree(terms)
            if finite:
                self.bad_streak = 0
                accelerator.backward(terms.total)
                if accelerator.sync_gradients and config.grad_clip > 0:
                    accelerator.clip_grad_norm_(model.parameters(), config.grad_clip)
                optimizer.step()
            else:
                self.bad_streak += 1
                if self.bad_streak >= config.max_bad_steps:
                    raise self._not_finite(terms)
            optimizer.zero_grad(set_to_none=True)
        return terms, skipped, read

    def _agree(self, terms) -> tuple[bool, int, int]:
        """(loss finite on every rank, unreadable train samples, samples read), summed over the ranks
        in one collective: every rank must take the same branch (or DDP hangs) and stop together."""
        finite = torch.isfinite(terms.total.detach()).long()
        skips = self.stream.skips
        status = torch.stack([finite, finite.new_tensor(skips.skipped), finite.new_tensor(skips.read)])
        if self.accelerator.num_processes > 1:
            status = self.accelerator.reduce(status, reduction="sum")
        finite_on_all, skipped, read = status.tolist()
        return finite_on_all == self.accelerator.num_processes, skipped, read

    def _last_good(self, lead: str) -> str:
        saved = self.last_saved
        return f"{lead}{self.run_dir / CHECKPOINTS}/checkpoint-{saved}" if saved else ""

    def _not_finite(self, terms) -> TrainingStopped:
        return TrainingStopped(
            f"the loss was not finite for {self.bad_streak} consecutive micro-batches (step {self.step_done + 1}; "
            f"last mse={terms.mse.item()}, kl={terms.kl.item()}"
            + (f", mse_prior={terms.mse_prior.item()}" if terms.mse_prior is not None else "")
            + "); stopped without saving. "
            + (self._last_good("The last good checkpoint is ") + "; " if self.last_saved else "")
            + "try a lower lr, grad_clip, or mixed_precision=bf16 instead of fp16"
        )

    def train(self) -> None:
        config, accelerator, stream = self.config, self.accelerator, self.stream
        self.model.train()
        self.step_done, self.bad_streak = self.start_step, 0
        self.last_saved = self.start_step if self.resume_from else None
        epoch_ended = False
        batches = stream.batches(self.start_step * config.grad_accum)
        progress = tqdm(
            total=config.max_steps, initial=self.start_step, disable=not accelerator.is_main_process,
            desc="train", mininterval=2,
        )  # fmt: skip
        window_start, window_images = time.perf_counter(), 0
        try:
            while self.step_done < config.max_steps:
                _, segment_end, batch = next(batches)
                epoch_ended = epoch_ended or segment_end  # remembered until the optimizer step it belongs to
                images, attributes = batch[0], batch[1]  # on accelerator.device already (BatchStream)
                if self.seen_file is not None:
                    self.seen_file.write("\n".join(batch[2]) + "\n")
                terms, skipped, read = self.step(images, attributes)
                window_images += len(images) * accelerator.num_processes
                if not accelerator.sync_gradients:
                    continue  # inside a gradient accumulation
                self.step_done += 1
                step = self.step_done
                self.scheduler.step()
                progress.update(1)
                if (problem := stream.skips.problem(skipped, read)) is not None:
                    raise TrainingStopped(
                        f"{problem}. Stopped after step {step}, not saved{self._last_good('; the last good checkpoint is ')}"
                    )

                if step % config.log_every == 0 or step == config.max_steps:
                    self._log(
                        terms, skipped, step, window_images / max(time.perf_counter() - window_start, 1e-9), progress
                    )
                    window_start, window_images = time.perf_counter(), 0
                if accelerator.is_main_process and (step % config.sample_every == 0 or step == config.max_steps):
                    self.write_grids(step)
                at_eval = (
                    (step % config.eval_every == 0)
                    if config.eval_every
                    else (epoch_ended and config.data.sampling == "epochs")
                )
                epoch_ended = False
                if at_eval and accelerator.is_main_process and step < config.max_steps:
                    self.evaluate(step)
                if self.bad_streak == 0 and (step % config.checkpoint_every == 0 or step == config.max_steps):
                    save_checkpoint(
                        accelerator, self.run_dir, step, self.spec, config.checkpoints_total_limit,
                        self.data_order, self.fingerprint, self.run_id, stream.resume_counts,
                    )  # fmt: skip
                    self.last_saved = step
        except RuntimeError as error:
            if worker_died(error):
                # PyTorch raises this wherever the main process is when the worker dies (the kernel's OOM
                # killer sends SIGKILL): the step under way is lost, the checkpoints before it are complete.
                what = (
                    f"a data loader worker died during step {self.step_done + 1} ({one_line(error).rstrip('. ')}; the kernel's "
                    "out-of-memory killer does this when memory runs out: lower data.num_workers, data.shuffle_buffer or batch_size)"
                )
            elif accelerator.num_processes > 1 and peer_lost(error):  # another rank stopped or was lost
                cause = re.sub(r"^\[[^\]]*\.cc:\d+\]\s*", "", one_line(error)).split(". This is typically")[0]
                what = (
                    f"another process of this run stopped or was lost during step {self.step_done + 1} "
                    f"({cause[:200].rstrip('. ')}); its own output says why (a process the kernel killed says nothing)"
                )
            else:
                raise
            last = find_checkpoint(self.run_dir, "latest")
            raise TrainingStopped(
                f"{what}; stopped, not saved; "
                + (
                    f"the last good checkpoint is {last}: {resume_advice('continue with resume=latest')}"
                    if last
                    else f"there is no checkpoint yet: {resume_advice('run it again')}"
                )
            ) from None
        finally:
            progress.close()
            batches.close()
            self.stream.close()  # stops the loader workers (and any pipe: readers) now, not at exit
            if self.seen_file is not None:
                self.seen_file.close()

    def _log(self, terms, skipped: int, step: int, images_per_s: float, progress) -> None:
        logs = {
            "train/loss": terms.total.item(),
            "train/mse": terms.mse.item(),
            "train/kl": terms.kl.item(),
            "train/lr": self.scheduler.get_last_lr()[0],
            "train/images_per_s": images_per_s,
            "train/epoch": step / self.steps_per_epoch,
            "train/skipped_samples": skipped,
        }
        if terms.mse_prior is not None:
            logs["train/mse_prior"] = terms.mse_prior.item()
        self.accelerator.log(logs, step=step)
        progress.set_postfix(
            loss=f"{logs['train/loss']:.1f}", mse=f"{logs['train/mse']:.1f}", kl=f"{logs['train/kl']:.1f}"
        )

    def write_grids(self, step: int) -> None:
        unwrapped = self.accelerator.unwrap_model(self.model).eval()
        tracker = self.accelerator.get_tracker("tensorboard", unwrap=True)
        (self.run_dir / SAMPLES).mkdir(exist_ok=True)
        samples = sample_grid(unwrapped, self.grid_attributes, self.grid_noise)
        save_grid(samples, self.run_dir / SAMPLES / f"step-{step:06d}.png")
        tracker.add_image("samples", samples, step)
        recon = reconstruction_grid(unwrapped, self.fixed_images, self.fixed_attributes)
        save_grid(recon, self.run_dir / SAMPLES / f"reconstructions-{step:06d}.png")
        tracker.add_image("reconstructions", recon, step)
        unwrapped.train()

    def evaluate(self, step: int) -> None:
        """The test split's metrics mid-run (main process only)."""
        try:
            metrics = heldout_metrics(
                self.accelerator.unwrap_model(self.model).eval(),
                self.config.data.shards,
                self.accelerator.device,
                max_skipped_fraction=self.config.data.max_skipped_fraction,
            )
        except UserError as error:
            # a damaged test split costs the metrics, never the run (and only this rank reads it)
            tqdm.write(f"warning: step {step}: no test metrics: {one_line(error)}", file=sys.stderr)
            return
        finally:
            self.accelerator.unwrap_model(self.model).train()
        self.accelerator.log(metrics, step=step)
        tqdm.write(
            f"step {step}: test MSE {metrics['test/mse_per_image']:.2f} per image "
            f"({metrics['test/mse_per_pixel']:.5f} per pixel), KL {metrics['test/kl_per_image']:.2f}"
        )

    # --- the end -----------------------------------------------------------------------------------

    def _final_save_failed(self, error: OSError) -> TrainingStopped:
        """The final weights + config.json could not be written: no half of the pair is left (new
        weights without their config.json are removed), and the checkpoint of the last step writes them."""
        weights = self.run_dir / WEIGHTS
        if error.filename != str(weights):  # the weights were written, their config.json was not
            weights.unlink(missing_ok=True)
        last = find_checkpoint(self.run_dir, "latest")
        return TrainingStopped(
            f"could not write the final model {error.filename or weights}: {describe_os_error(error)}; "
            + (
                f"the last complete checkpoint is {last}: free some space and "
                + resume_advice("run again with resume=latest, which writes them")
                if last
                else "there is no complete checkpoint: free some space and " + resume_advice("run again")
            )
        )

    def finish(self) -> Path:
        """Final test metrics, weights + config.json and the sample grid (main process)."""
        config, accelerator, run_dir, step = self.config, self.accelerator, self.run_dir, self.step_done
        if self.stream.skips.skipped:  # each rank its own; TensorBoard's train/skipped_samples is the sum
            tqdm.write(f"warning: {self.stream.skips.summary()}", file=sys.stderr)
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            final = accelerator.unwrap_model(self.model).eval()
            try:
                metrics = heldout_metrics(
                    final,
                    config.data.shards,
                    accelerator.device,
                    max_skipped_fraction=config.data.max_skipped_fraction,
                )
                accelerator.log(metrics, step=step)
            except UserError as error:  # a damaged test split must not throw away a finished run
                metrics = {}
                tqdm.write(f"warning: no final test metrics: {one_line(error)}", file=sys.stderr)
            final.spec.extra = {
                "recipe": config.recipe,
                "step": step,
                "beta": config.beta,
                "toolkit_version": toolkit.__version__,
                RUN_ID: self.run_id,
                **{k.replace("test/", "test_"): round(v, 4) for k, v in metrics.items()},
            }
            try:
                save_model(final, run_dir)
            except OSError as error:  # e.g. a full disk: one line, and the checkpoint that writes them later
                raise self._final_save_failed(error) from error
            save_grid(sample_grid(final, self.grid_attributes, self.grid_noise), run_dir / SAMPLES_GRID)
            if metrics:
                print(
                    f"test: MSE {metrics['test/mse_per_image']:.2f} per image ({metrics['test/mse_per_pixel']:.5f} per pixel), "
                    f"KL {metrics['test/kl_per_image']:.2f} per image"
                )
            print(f"saved {run_dir / WEIGHTS} and {run_dir / CONFIG}; samples: {run_dir / SAMPLES_GRID}")
        accelerator.end_training()
        return run_dir


def interrupted(config: TrainConfig | None) -> str:
    """What a Ctrl-C (SIGINT) left, in one line: the run folder's lock is released, the save under way
    (if any) is not a checkpoint, the last complete one is: continue from it."""
    if config is None:
        return BEFORE_THE_RUN
    run_dir = Path(config.run_dir)
    try:
        last = find_checkpoint(run_dir, "latest")
    except (OSError, UserError):
        last = None
    return "interrupted (Ctrl-C): stopped, not saved; " + (
        f"the last complete checkpoint is {last}: {resume_advice('continue with resume=latest')}"
        if last
        else f"there is no checkpoint in {run_dir / CHECKPOINTS} yet: {resume_advice('run it again')}"
    )


def stop_on_interrupt(config: TrainConfig | None) -> None:
    """Say `interrupted(config)` once (on the main process of several: every rank gets the Ctrl-C)
    and exit 130, instead of a traceback per process."""
    if os.environ.get("RANK", "0") == "0":
        print(f"error: {interrupted(config)}", file=sys.stderr)
    raise SystemExit(INTERRUPTED_EXIT) from None


def main(argv: list[str] | None = None) -> None:
    begin()  # for callers that import this module and call main
    usual_interrupt()  # from here on a Ctrl-C is a KeyboardInterrupt, which says what the run left
    args = sys.argv[1:] if argv is None else argv
    config = None
    try:
        config = load_config(args)
        train(config)
    except KeyboardInterrupt:
        stop_on_interrupt(config)
    except UserError as error:
        print(f"error: {one_line(error)}", file=sys.stderr)
        raise SystemExit(2) from None
    except OSError as error:  # as `cvae-tk train` says it: a file system's refusal is one line, not a traceback
        where = f"{error.filename}: " if error.filename else ""
        print(f"error: {one_line(where + describe_os_error(error))}", file=sys.stderr)
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()
