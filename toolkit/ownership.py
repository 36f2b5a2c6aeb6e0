"""Output folders belong to what writes them.

`claim_folder`: a command that writes fixed names into a folder the user chose (`cvae-tk web`'s
index.html, the sweep's table1.md) marks it with a hidden owner file before writing, and refuses a
folder where those names exist without the mark: the user's own files are never replaced.

`FolderLock`: one writer at a time, FOLDER/.lock, created with O_EXCL while a command writes FOLDER.

Training (run_dir), shard builds and classifier training (--out) each write several files that only
make sense together (checkpoints, tars + manifest, weights + their description); two at once would
mix them. The lock holds {"pid", "host", "started"} of its holder. A second writer is refused while
the first runs; a lock left by a killed one (its pid gone, on this host) is taken over with a
warning; one from another host is only reported, since its pid cannot be checked from here.
"""

from __future__ import annotations

import json
import os
import socket
import sys
import time
from pathlib import Path

from tqdm import tqdm

from toolkit.errors import UserError
from toolkit.formats import LOCK


def claim_folder(folder: Path, names, owner: str, earlier=lambda folder: False, option: str = "--out") -> None:
    """Make `folder` (created if need be) one that `owner` (a hidden file name, ".cvae-tk-web")
    marks as written by the toolkit, so that the files `names` (relative paths) may be replaced in
    it. Refused, before anything is written, when any of `names` exists and neither the mark nor
    `earlier(folder)` (a folder written before the mark existed) says the toolkit wrote it."""
    folder = Path(folder)
    if not (folder / owner).is_file() and not earlier(folder):
        taken = [name for name in names if os.path.lexists(folder / name)]
        if taken:
            shown = ", ".join(taken[:4]) + (f" and {len(taken) - 4} more" if len(taken) > 4 else "")
            raise UserError(
                f"{option} {folder} holds files that cvae-tk did not write there ({shown}): they would be replaced; "
                f"move them away or choose another {option}"
            )
    folder.mkdir(parents=True, exist_ok=True)
    (folder / owner).touch()  # empty: its name says it all


def _pid_alive(pid: int, started: float | None) -> bool:
    import psutil

    try:
        process = psutil.Process(pid)
        # a pid reused by another process since: that one started later than the lock was taken
        return started is None or process.create_time() <= started + 1
    except (psutil.NoSuchProcess, psutil.AccessDenied, ValueError, OverflowError):
        return isinstance(pid, int) and pid > 0 and psutil.pid_exists(pid)


class FolderLock:
    """`folder`/.lock for one writer. `what` names the writer ("training", "shard build"), `option`
    the setting that chose the folder ("run_dir", "--out"), `mixes` what two writers would mix
    ("checkpoints"). Use `acquire()` / `release()`, or `with` (which creates the folder)."""

    def __init__(self, folder: Path, what: str, option: str, mixes: str):
        self.folder, self.path, self.held = Path(folder), Path(folder) / LOCK, False
        self.what, self.option, self.mixes = what, option, mixes

    @property
    def _named(self) -> str:
        return f"{self.option}={self.folder}" if self.option.isidentifier() else f"{self.option} {self.folder}"

    def acquire(self) -> None:
        me = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.time()}
        for _ in range(3):
            try:
                fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            except FileExistsError:
                self._check_holder()  # raises unless the holder is gone; then try again
                continue
            except OSError as error:
                raise UserError(f"cannot write in {self._named}: {error.strerror or error}") from None
            with os.fdopen(fd, "w") as stream:
                stream.write(json.dumps(me) + "\n")
            self.held = True
            return
        raise UserError(f"could not take the lock {self.path}: another process keeps creating it")

    def _check_holder(self) -> None:
        choose = f"choose another {self.option}"
        try:
            holder = json.loads(self.path.read_text())
            pid, host = int(holder["pid"]), str(holder["host"])
            started = float(holder["started"]) if "started" in holder else None
        except FileNotFoundError:
            return  # released meanwhile
        except (OSError, ValueError, KeyError, TypeError):
            holder = None
            try:  # empty for a moment while its taker writes it: only an old one is stale
                if time.time() - self.path.stat().st_mtime < 10:
                    raise UserError(
                        f"another {self.what} is starting in {self._named} ({self.path} was just created): "
                        f"wait for it to end, or {choose}"
                    )
            except FileNotFoundError:
                return
        if holder is not None and host != socket.gethostname():
            raise UserError(
                f"{self._named} is locked by a {self.what} on {host} (pid {pid}): wait for it to end, or {choose}; "
                f"if no {self.what} runs there any more, delete {self.path}"
            )
        if holder is not None and _pid_alive(pid, started):
            raise UserError(
                f"another {self.what} (pid {pid} on this machine) is writing {self._named}: wait for it to end, or "
                f"{choose} (two at once in one folder would mix their {self.mixes})"
            )
        what = f"pid {pid} is gone" if holder is not None else "it is unreadable"
        tqdm.write(
            f"warning: taking over the stale lock {self.path} ({what}: a {self.what} that was killed)", file=sys.stderr
        )
        self.path.unlink(missing_ok=True)

    def release(self) -> None:
        if self.held:
            self.path.unlink(missing_ok=True)
            self.held = False

    def __enter__(self) -> "FolderLock":
        """Create the folder (a UserError if it cannot be) and take its lock; a folder made here is
        removed again if the lock is refused, or if the writer fails leaving it empty."""
        self.created = not self.folder.exists()
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
        except OSError as error:
            raise UserError(f"cannot create {self._named}: {error.strerror or error}") from None
        try:
            self.acquire()
        except BaseException:
            self._remove_if_made()
            raise
        return self

    def __exit__(self, kind, error, trace) -> bool:
        self.release()
        if kind is not None:
            self._remove_if_made()
        return False

    def _remove_if_made(self) -> None:
        if self.created:
            try:
                self.folder.rmdir()  # only when empty: nothing written is ever removed here
            except OSError:
                pass
