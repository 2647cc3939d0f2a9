"""Errors caused by bad input (a file, a flag, a config value, a dataset).

Command-line entry points print a :class:`UserError` as one line
(``error: <message>``) and exit with status 2, without a traceback; anything
else is a bug and keeps its traceback.
"""


class UserError(ValueError):
    """Bad input: the message says what is wrong and what to do."""
