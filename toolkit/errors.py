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


def printable(text: str, keep=str.isprintable) -> str:
    """`text` (a file's or a table's, not ours) as one line of characters that print, the others as
    Python escapes (\\n, \\x1b, \\u65e5): a newline would forge a line, an escape sequence restyle the
    terminal. `keep`: which characters stay as they are."""
    return "".join(c if keep(c) else _escape(c) for c in text)


def _escape(char: str) -> str:
    # a file name's byte that is not UTF-8 (os.fsdecode's escape): \xff, as ls shows it
    if "\udc80" <= char <= "\udcff":
        return f"\\x{ord(char) - 0xDC00:02x}"
    return char.encode("unicode_escape", "backslashreplace").decode("ascii")


def cut(text: str, limit: int = 80) -> str:
    """`text`, cut to `limit` characters ('...' after): text quoted in a message or a label, where a
    line or a field may be megabytes long."""
    return text if len(text) <= limit else text[:limit] + "..."


MAX_INT = 2**63 - 1  # torch and numpy take 64-bit integers: config.validate bounds every integer key so
MAX_SEED = MAX_INT  # what torch's and numpy's generators both take as they are


def check_int(value, option: str, low: int = 0) -> int:
    """An integer in [low, 2**63): the range of every integer setting (config.validate; max_steps is
    [1, 2**63)). A count beyond it was a traceback deep in torch or numpy, or a loop that ran for ever."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or not low <= value <= MAX_INT:
        raise UserError(f"{option} must be an integer in [{low}, 2**63), got {value!r}")
    return int(value)


def check_seed(seed, option: str = "seed") -> int:
    """An integer in [0, 2**63): torch wraps a negative seed silently and overflows on a huge one."""
    return check_int(seed, option, 0)


def dimensions(width: int, height: int) -> str:
    """An image's size in a message: '178 wide x 218 high', spelt out, since --size takes HxW (CelebA's
    218x178) and PIL's WxH would read as the other way round."""
    return f"{width} wide x {height} high"
