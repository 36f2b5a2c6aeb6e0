"""The one exception type for user mistakes: the CLI prints its message on one line, no traceback;
and the seed check several modules share.

Standard library only: `cvae-tk sample` imports it without torch."""

import numbers


class UserError(Exception):
    """Bad input from the user (a path, a recipe key, an attribute name...).

    The message names the thing and what was expected; nothing has been written half-way.
    """


def one_line(message: object) -> str:
    """Collapse a (library) message onto one line: the CLI promises one line per error."""
    return " ".join(str(message).split())


MAX_SEED = 2**63 - 1  # what torch's and numpy's generators both take as they are


def check_seed(seed, option: str = "seed") -> int:
    """An integer in [0, 2**63): torch wraps a negative seed silently and overflows on a huge one."""
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral) or not 0 <= seed <= MAX_SEED:
        raise UserError(f"{option} must be an integer in [0, 2**63), got {seed!r}")
    return int(seed)
