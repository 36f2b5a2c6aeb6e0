"""The run folder's layout and ownership: which files a run writes, its checkpoints, the lock that
keeps a second training out, and the fingerprint that ties a checkpoint to its shards.

    RUN/.lock                          {"pid", "host", "started"} of the training writing RUN
    RUN/checkpoints/checkpoint-<step>/ complete once trainer_state.json is in it
    RUN/model.safetensors, config.json, recipe.yaml, samples.png, samples/, logs/, metrics.json, seen/

`toolkit.train` takes the lock, claims the folder (`claim_run_dir`), gives the run its identity
(`run_identity`) and writes the checkpoints; the sweep and the export read checkpoints through
`find_checkpoint`.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import re
import shutil
import stat
import sys
import uuid
from pathlib import Path

from tqdm import tqdm

from toolkit.config import TrainConfig, continues_run_dir
from toolkit.data.stream import is_url, read_manifest
from toolkit.errors import UserError, one_line
from toolkit.formats import CHECKPOINTS, LOCK, RECIPE, RUN_FILES, RUN_ID, is_debris  # noqa: F401 (CHECKPOINTS, RUN_FILES: re-exported)
from toolkit.ownership import FolderLock

TRAINER_STATE = "trainer_state.json"  # written last into a checkpoint: its presence marks it complete


def checkpoint_step(path: Path) -> int | None:
    """The step of a complete checkpoint folder, from its name `checkpoint-<step>` (complete: it holds
    trainer_state.json, which the save writes last), or None (not a checkpoint, or an interrupted save)."""
    match = re.fullmatch(r"checkpoint-(\d+)", path.name)
    if match is None or not (path / TRAINER_STATE).is_file():
        return None
    return int(match.group(1))


def read_trainer_state(path: Path) -> dict:
    """The trainer_state.json of the checkpoint folder `path`, checked: a JSON object whose `step` is
    the one in the folder's name, and whose records (model, data order, shards; an older checkpoint
    lacks some) are JSON objects. Anything else is a UserError naming the file: a checkpoint renamed
    or edited by hand is never resumed at a step it was not saved at, nor compared with a record
    that is not one."""
    file = path / TRAINER_STATE
    try:
        state = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:  # UnicodeDecodeError is a ValueError
        raise UserError(f"{file} is not readable: {one_line(error)}") from None
    if not isinstance(state, dict):
        raise UserError(f"{file} is not a checkpoint's record: expected a JSON object, got {type(state).__name__}")
    step = state.get("step")
    if type(step) is not int or step != checkpoint_step(path):
        raise UserError(
            f"{file} records step {step!r}, but the folder is named {path.name}: a checkpoint renamed or edited "
            "by hand cannot tell which step it holds; resume another checkpoint, or restore its name"
        )
    for key in ("model", "data_order", "shards"):
        if not isinstance(state.get(key, {}), dict):
            raise UserError(f"{file}: its '{key}' record is a {type(state[key]).__name__}, expected a JSON object")
    for split, record in state.get("shards", {}).items():
        if not isinstance(record, dict) or not isinstance(record.get("tars") or {}, dict):
            raise UserError(f"{file}: its record of the {split!r} split is not one that a save writes")
    return state


def run_identity(run_dir: Path, resume_from: Path | None) -> str:
    """The identity (formats.RUN_ID) of the run training into `run_dir`: that of the checkpoint of
    this folder it continues, else a new one (a new run, one overwrite=true replaced, one resumed
    from another folder's checkpoint: two folders, two runs; a checkpoint from before identities)."""
    if resume_from is not None and continues_run_dir(str(resume_from), run_dir):
        found = read_trainer_state(resume_from).get(RUN_ID)
        if isinstance(found, str) and re.fullmatch(r"[0-9a-f]{32}", found):
            return found
    return uuid.uuid4().hex


def find_checkpoint(run_dir: Path, resume: str) -> Path | None:
    """`resume=latest` -> the newest complete checkpoint of the run (None if there is none);
    `resume=PATH` -> that checkpoint, which must be complete."""
    if not resume:
        return None
    if resume == "latest":
        found = complete_checkpoints(run_dir)
        return found[-1] if found else None
    path = Path(resume)
    if checkpoint_step(path) is None:
        # a folder that is not there is most often a typo of latest, or a checkpoint's name without its run
        missing = "" if path.exists() else " (no such folder)"
        raise UserError(
            f"resume={resume} is not a complete checkpoint{missing}: expected latest, or the path of a "
            f"checkpoint-<step> folder holding {TRAINER_STATE}, such as {run_dir / CHECKPOINTS}/checkpoint-<step>"
        )
    return path


def complete_checkpoints(run_dir: Path) -> list[Path]:
    """The run's complete checkpoints, oldest first."""
    found = [(checkpoint_step(p), p) for p in (run_dir / CHECKPOINTS).glob("checkpoint-*")]
    return [p for step, p in sorted((step, p) for step, p in found if step is not None)]


FINGERPRINT_BYTES = 1 << 16  # of each end of a tar: its first samples' names and bytes, and its last ones'


def shards_fingerprint(shards: str, manifests: dict[str, dict] | None = None) -> dict:
    """What identifies the shards a run trains on, per split: the sha256 of its manifest (as parsed,
    so formatting does not count) and, for a local folder, per tar its size and the sha256 of its
    first and last 64 KB (two builds with the same names and counts but other images differ there;
    reading whole tars would cost minutes on large sets). Shards rebuilt byte-identical give the same
    fingerprint, wherever they lie. `manifests`: {split: manifest} where the caller has read them."""
    result = {}
    for split in ("train", "test"):
        manifest = (manifests or {}).get(split) or read_manifest(shards, split)
        # `files` (each tar's sha256, recorded by newer builds) has a digest of its own, so that a
        # checkpoint from before it existed still resumes on the same shards rebuilt
        described = {key: value for key, value in manifest.items() if key != "files"}
        tars = None
        if not is_url(shards):
            tars = {name: _tar_fingerprint(Path(shards) / split / name) for name in manifest["shards"]}
        result[split] = {"manifest_sha256": _digest(described), "tars": tars}
        if "files" in manifest:
            result[split]["files_sha256"] = _digest(manifest["files"])
    return result


def fingerprint_difference(then: dict, now: dict) -> tuple[str, str] | None:
    """(split, how it differs) for the first split whose shards_fingerprint `now` is not `then` (a
    checkpoint's record), or None. What `then` does not record (an older toolkit) is not compared."""
    for split, current in now.items():
        recorded = (then or {}).get(split)
        if not recorded:
            continue
        if recorded.get("manifest_sha256") != current["manifest_sha256"]:
            return split, (
                f"its manifest differs (sha256 {str(recorded.get('manifest_sha256'))[:12]}... then, "
                f"{current['manifest_sha256'][:12]}... now)"
            )
        if recorded.get("files_sha256") and current.get("files_sha256"):
            if recorded["files_sha256"] != current["files_sha256"]:
                return split, "the tars' recorded sha256 checksums differ"
        if recorded.get("tars") and current["tars"]:  # both local folders
            changed = [name for name in current["tars"] if recorded["tars"].get(name) != current["tars"][name]]
            if changed:
                more = f" and {len(changed) - 1} more shard(s)" if len(changed) > 1 else ""
                return split, f"{changed[0]} holds other bytes{more}"
    return None


def trained_shards_difference(run_dir: Path, shards: str) -> str | None:
    """How the shards now at `shards` differ from the ones the newest checkpoint of RUN was trained
    on ("the test split: its manifest differs ..."), or None: the same, or nothing recorded to
    compare with (no checkpoint left, or one of an older toolkit)."""
    latest = find_checkpoint(Path(run_dir), "latest")
    try:
        recorded = read_trainer_state(latest).get("shards") if latest else None
    except UserError:  # a damaged record: training refuses that checkpoint, saying why
        recorded = None
    if not recorded:
        return None
    found = fingerprint_difference(recorded, shards_fingerprint(shards))
    return None if found is None else f"the {found[0]} split: {found[1]}"


def _digest(value) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True).encode()).hexdigest()


def _tar_fingerprint(path: Path) -> str | None:
    try:
        with open(path, "rb") as stream:
            size = os.fstat(stream.fileno()).st_size
            digest = hashlib.sha256(stream.read(FINGERPRINT_BYTES))
            stream.seek(max(size - FINGERPRINT_BYTES, 0))
            digest.update(stream.read(FINGERPRINT_BYTES))
    except OSError:
        return None  # a missing or unreadable shard is the reader's to report (skipped and counted)
    return f"{size}:{digest.hexdigest()}"


# --- the run folder belongs to one run ------------------------------------------------------


class RunLock(FolderLock):
    """RUN/.lock: a second training into the same folder is refused while the first runs (see FolderLock)."""

    def __init__(self, run_dir: Path):
        super().__init__(run_dir, "training", "run_dir", "checkpoints")


def _own_file(name: str) -> bool:
    """One of RUN_FILES, or the hidden temporary file of one (`.model.safetensors.<pid>.tmp`, left by a kill)."""
    match = re.fullmatch(r"\.(.+)\.\d+\.tmp", name)
    return name in RUN_FILES or (match is not None and match.group(1) in RUN_FILES)


def _names(paths: list[Path], n: int = 4) -> str:
    shown = ", ".join(sorted(p.name for p in paths)[:n])
    return shown + (f" and {len(paths) - n} more" if len(paths) > n else "")


def _kind(mode: int) -> str:
    for test, name in (
        (stat.S_ISREG, "a file"),
        (stat.S_ISFIFO, "a named pipe"),
        (stat.S_ISSOCK, "a socket"),
        (stat.S_ISCHR, "a device"),
        (stat.S_ISBLK, "a device"),
    ):
        if test(mode):
            return name
    return "not a folder"


def non_folder(path: Path) -> str | None:
    """What stands at `path` where a folder is wanted ('is a file', 'is a symbolic link to X, which does
    not exist'), or None where there is a folder (a link to one too) or nothing."""
    try:
        info = os.lstat(path)
    except (OSError, ValueError):  # nothing there (or a name the system refuses: creating it says why)
        return None
    if stat.S_ISDIR(info.st_mode):
        return None
    if not stat.S_ISLNK(info.st_mode):
        return f"is {_kind(info.st_mode)}"
    try:
        target = os.readlink(path)
    except OSError:  # removed since lstat: nothing there
        return None
    try:
        reached = os.stat(path)
    except OSError as error:
        if error.errno == errno.ELOOP:
            return "is a symbolic link that leads back to itself (a loop of links)"
        return f"is a symbolic link to {target}, which does not exist (a disk not mounted, a folder moved?)"
    if stat.S_ISDIR(reached.st_mode):
        return None
    return f"is a symbolic link to {_kind(reached.st_mode)} ({target})"


def refuse_non_folder(run_dir: Path, remedy: str | None = None) -> None:
    """A UserError naming what stands at run_dir, where that is no folder training can write into."""
    what = non_folder(run_dir)
    if what is not None:
        raise UserError(
            f"run_dir={run_dir} {what}, expected a folder (or a path that does not exist yet): "
            + (remedy or "choose another run_dir")
        )


def claim_run_dir(config: TrainConfig, run_dir: Path, resume_from: Path | None, remedy: str | None = None) -> None:
    """A run folder belongs to one run. Refuse to train into one that holds another run (a model,
    checkpoints, or a recipe.yaml with other settings) unless resume= continues it or overwrite=true
    replaces it (removing that run's files first, and only those); refuse a folder holding files that
    are not a run's. The same run killed before its first checkpoint starts again (nothing of it is kept).
    With overwrite=false nothing is changed: a check (the sweep's, before any run trains). `remedy`:
    what a refusal tells to do instead of the training command line's options."""
    if not run_dir.is_dir():
        refuse_non_folder(run_dir, remedy)
        return
    entries = [p for p in run_dir.iterdir() if p.name != LOCK and not is_debris(p.name)]  # .DS_Store: kept
    ours, foreign = [p for p in entries if _own_file(p.name)], [p for p in entries if not _own_file(p.name)]
    if resume_from is not None and continues_run_dir(str(resume_from), run_dir):
        return  # continuing this folder's run: _check_resume has compared the model and shards
    if foreign:
        raise UserError(
            f"run_dir={run_dir} holds files that are not a cvae-tk run's ({_names(foreign)}): "
            + ("overwrite=true replaces only a run's own files; " if config.overwrite else "")
            + (remedy or "move them away or choose another run_dir")
        )
    if not ours:
        return
    if config.overwrite:
        for path in ours:
            shutil.rmtree(path) if path.is_dir() and not path.is_symlink() else path.unlink()
        tqdm.write(f"overwrite=true: removed the previous run's {_names(ours, 10)} from {run_dir}", file=sys.stderr)
        return
    checkpoints = complete_checkpoints(run_dir)
    finished = (run_dir / "model.safetensors").is_file()
    held = []
    if finished:
        held.append("a finished model (model.safetensors)")
    if checkpoints:
        held.append(f"{len(checkpoints)} checkpoint(s), the newest {checkpoints[-1].name}")
    if not held:
        differ = _differences(run_dir, config)
        if differ is None:  # the line named a recipe.yaml that is there as missing
            readable = (
                "whose recipe.yaml cannot be read" if os.path.lexists(run_dir / RECIPE) else "without its recipe.yaml"
            )
            held.append(f"a run's files ({_names(ours)}) {readable}")
        elif differ:
            held.append(
                "a run with other settings ("
                + "; ".join(f"{k}: {old!r} there, {new!r} now" for k, (old, new) in list(differ.items())[:3])
                + ")"
            )
        else:
            return  # this same run, killed before its first checkpoint: start it again
    if resume_from is not None:
        how = f"resume={config.resume} is a checkpoint of another folder, and run_dir"
    elif config.resume:
        how = f"resume={config.resume} found no complete checkpoint, and run_dir"
    else:
        how = "run_dir"
    raise UserError(
        f"{how}={run_dir} already holds {' and '.join(held)}: "
        + (
            remedy
            or ("continue it with resume=latest, " if checkpoints and not config.resume else "")
            + "replace it with overwrite=true (its checkpoints, model, samples and logs are removed), or choose another run_dir"
        )
    )


def _differences(run_dir: Path, config: TrainConfig) -> dict | None:
    """The settings in which RUN/recipe.yaml differs from `config` (those that change what is trained;
    the sweep's own comparison), or None without a readable recipe.yaml."""
    from toolkit.sweep import RESUMABLE_KEYS, config_differences

    if not (run_dir / RECIPE).is_file():
        return None
    try:
        differ = config_differences(run_dir, config)
    except UserError:
        return None
    return {
        k: v
        for k, v in differ.items()
        if k not in RESUMABLE_KEYS and k not in ("overwrite", "data.num_workers", "data.record_keys")
    }
