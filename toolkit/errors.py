"""The one exception type for user mistakes: the CLI prints its message on one line, no traceback."""


class UserError(Exception):
    """Bad input from the user (a path, a recipe key, an attribute name...).

    The message names the thing and what was expected; nothing has been written half-way.
    """


def one_line(message: object) -> str:
    """Collapse a (library) message onto one line: the CLI promises one line per error."""
    return " ".join(str(message).split())
