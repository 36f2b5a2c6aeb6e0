"""How much memory this process may still allocate, so that absurd sizes are refused before they
are allocated (one line instead of a MemoryError, or the kernel's OOM killer ending the process).

Standard library only: the sampler uses it without torch or psutil.
"""

from __future__ import annotations

import os
from pathlib import Path

from toolkit.errors import UserError

GiB = 2**30


def _cgroup_room() -> int | None:
    """What the cgroup (a container's memory limit) still allows: limit - usage; None if unlimited."""
    for limit_file, usage_file in (
        ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current"),  # cgroup v2
        ("/sys/fs/cgroup/memory/memory.limit_in_bytes", "/sys/fs/cgroup/memory/memory.usage_in_bytes"),  # v1
    ):
        try:
            limit = Path(limit_file).read_text().strip()
            usage = int(Path(usage_file).read_text().strip())
        except (OSError, ValueError):
            continue
        if limit.isdigit() and int(limit) < 2**60:  # "max", or v1's huge number: no limit
            return max(int(limit) - usage, 0)
    return None


def available_bytes() -> int | None:
    """Memory available to this process now (the machine's available memory, or the container's
    room when that is less); None where it cannot be told (then nothing is refused)."""
    found = None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                found = int(line.split()[1]) * 1024
                break
    except (OSError, ValueError, IndexError):
        pass
    if found is None:
        try:
            found = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        except (AttributeError, ValueError, OSError):
            try:
                import psutil  # Windows, macOS

                found = psutil.virtual_memory().available
            except Exception:
                return None
    room = _cgroup_room()
    return found if room is None else min(found, room)


def gib(size: int) -> str:
    return f"{size / GiB:.1f} GiB" if size >= GiB / 10 else f"{size / 2**20:.1f} MiB"


def check_fits(needed: int, what: str, advice: str) -> None:
    """A UserError when `needed` bytes are more than the memory available now:
    '<what> needs 12.0 GiB of memory, but only 3.1 GiB is available: <advice>'."""
    available = available_bytes()
    if available is not None and needed > available:
        raise UserError(f"{what} needs {gib(needed)} of memory, but only {gib(available)} is available: {advice}")
