"""The one exception type the CLI turns into a single line on stderr and a non-zero exit, and message helpers."""


class RegproxyError(Exception):
    """An error whose message is written for the user: one line, saying what went wrong and what to do."""


def listed(items: list[str], limit: int = 5, sep: str = ", ") -> str:
    """The first ``limit`` items joined, and how many more there are: error messages stay one short line."""
    return sep.join(items[:limit]) + (f" (+{len(items) - limit} more)" if len(items) > limit else "")


def one_line(error: BaseException) -> str:
    """An exception's message squeezed onto one line, or its type name when it has none."""
    text = " ".join(str(error).split())
    return text or type(error).__name__
