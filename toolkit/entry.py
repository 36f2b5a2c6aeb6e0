"""What every entry point (`cvae-tk`, toolkit/train.py) does first, before torch is imported: keep
the process going when the reader of its output goes away, and check that its current folder still
exists.

Standard library only.
"""

from __future__ import annotations

import io
import os
import signal
import sys

CWD_GONE = "the current folder no longer exists (deleted?); cd to an existing folder and run again"

# Said on stderr, once, when stdout's reader goes away, by a command whose work outlives its log
# (train, sweep); the others (sample, inspect, ...) end quietly, as `yes | head` does.
_going_on: str | None = None


def when_stdout_closes(what_goes_on: str) -> None:
    """Say `what_goes_on` if stdout's reader goes away (`cvae-tk train ... | head -1`)."""
    global _going_on
    _going_on = what_goes_on


def begin() -> None:
    """Guard stdout and stderr, then check the current folder: a deleted one is one line, exit 2."""
    guard_output()
    try:
        os.getcwd()
    except FileNotFoundError:
        # importing torch there dies with oneMKL's "FATAL ERROR: Cannot load libtorch_cpu.so"
        print(f"error: {CWD_GONE}", file=sys.stderr)
        raise SystemExit(2) from None


class _Output(io.FileIO):
    """The descriptor of stdout or stderr, written as usual until its reader goes away (EPIPE)."""

    def write(self, data) -> int:
        try:
            return super().write(data)
        except BrokenPipeError:
            # The Python docs' recipe: /dev/null onto the descriptor, so the work goes on and later
            # writes (the flush at exit too) succeed instead of ending the process or printing noise.
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, self.fileno())
            os.close(devnull)
            if self.fileno() == 1 and _going_on:
                print(f"cvae-tk: stdout was closed (broken pipe); {_going_on}", file=sys.stderr, flush=True)
            return memoryview(data).nbytes


def guard_output() -> None:
    """sys.stdout and sys.stderr through _Output, line by line (a log piped to tee or head is read as
    it is written). Only the process's own streams: ones a caller replaced (pytest's capture) stay."""
    for name in ("stdout", "stderr"):
        stream = getattr(sys, name)
        if stream is None or stream is not getattr(sys, f"__{name}__"):
            continue  # closed at start (Python then prints nothing), or already replaced
        try:
            descriptor = stream.fileno()
            stream.flush()
        except (OSError, ValueError):
            continue  # not a real file
        raw = _Output(descriptor, "w", closefd=False)
        # A file name that is not UTF-8 (Python holds its bytes as surrogate escapes) is printed as
        # its bytes, as `ls` prints it: under a UTF-8 locale stdout is strict, and `wrote <name>`
        # failed with a UnicodeEncodeError after the work was done.
        errors = "surrogateescape" if stream.errors == "strict" else stream.errors
        setattr(
            sys,
            name,
            io.TextIOWrapper(
                io.BufferedWriter(raw),
                encoding=stream.encoding,
                errors=errors,
                line_buffering=True,
                write_through=stream.write_through,
            ),
        )


INTERRUPTED_EXIT = 130  # as a shell reports a command that Ctrl-C stopped (128 + SIGINT)

# Set by `cvae-tk sweep` for the training processes it starts: they are continued by running the sweep
# again (which passes resume=latest to each beta), not by a training command line the user never typed.
IN_SWEEP = "CVAE_TK_SWEEP"
SWEEP_AGAIN = (
    "run the same cvae-tk sweep command again, which reuses the finished betas and resumes the others "
    "from their last checkpoints"
)


# What a Ctrl-C leaves, said by `cvae-tk` after "interrupted (Ctrl-C): ": every output goes through
# toolkit/atomic.py, so a file is either whole or not there. A command whose work leaves more than
# that to say (a shard build without its manifests) says so where its work begins; train and sweep
# say their own line (the checkpoint to continue from).
_USUAL_NOTE = "stopped; no file was left half-written (each is written whole or not at all)"
_interrupt_note = _USUAL_NOTE


def on_interrupt(note: str = _USUAL_NOTE) -> None:
    """From here on, a Ctrl-C of this command is said as `interrupted (Ctrl-C): <note>`; no note: the
    usual one, which each command starts with (cli._Commands)."""
    global _interrupt_note
    _interrupt_note = note


def interrupted_line() -> str:
    return f"interrupted (Ctrl-C): {_interrupt_note}"


def resume_advice(usual: str) -> str:
    """How to continue a stopped training: `usual` ('continue with resume=latest', 'run it again'), or,
    in a sweep's training process, the sweep's command again."""
    return SWEEP_AGAIN if os.environ.get(IN_SWEEP) == "1" else usual


BEFORE_THE_RUN = "interrupted (Ctrl-C) before the run began: nothing was written"  # train's line then


def _interrupted_early(signum, frame) -> None:
    if os.environ.get("RANK", "0") == "0":  # `accelerate launch`: every rank gets the Ctrl-C; one says it
        print(f"error: {BEFORE_THE_RUN}", file=sys.stderr, flush=True)
    os._exit(INTERRUPTED_EXIT)


def quiet_interrupt() -> None:
    """Until usual_interrupt(): a Ctrl-C ends the process at once with one line (exit 130), not a
    traceback from inside an import. Left alone where SIGINT is ignored (started with `&`, nohup)."""
    if signal.getsignal(signal.SIGINT) is signal.default_int_handler:
        try:
            signal.signal(signal.SIGINT, _interrupted_early)
        except ValueError:  # not the main thread (a program calling the CLI from one): Ctrl-C is not ours
            pass


def usual_interrupt() -> None:
    """Undo quiet_interrupt(): a Ctrl-C raises KeyboardInterrupt again."""
    if signal.getsignal(signal.SIGINT) is _interrupted_early:
        signal.signal(signal.SIGINT, signal.default_int_handler)
