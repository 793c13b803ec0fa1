"""The one exception type the CLI turns into a single line on stderr and a non-zero exit."""


class RegproxyError(Exception):
    """An error whose message is written for the user: one line, saying what went wrong and what to do."""
