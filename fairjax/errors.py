"""The one error hierarchy: errors caused by bad input (a file, a flag, a config value, a dataset).

Command-line entry points print a :class:`UserError` as one line (``error: <message>``) and exit
with status 2, without a traceback; anything else is a bug and keeps its traceback. Every message
says what is wrong and what to do.

    UserError
      ConfigError         a config file, preset, key or value; a model config this port does not implement
      CheckpointError     a model dir, safetensors file, orbax checkpoint or conversion source
      DataError           a preference / VILA-U dataset, a record, a prompt file, a text-embedding cache
      ShardingError       a mesh, partition rule or batch that does not fit the devices
      OutputError         an output path that would overlap an input, is in use by another run, or that the
                          operating system refuses (read-only, disk full, a file where a folder goes)
      NonFiniteLossError  the loss or gradient became NaN/inf (also a FloatingPointError)

    Interrupted           not an error: SIGTERM / SIGINT stopped the job after the current stage saved
                          what it could (a BaseException, like KeyboardInterrupt: ``except Exception``
                          blocks do not swallow it); entry points print it as one line and exit with
                          128 + the signal's number (143 SIGTERM, 130 SIGINT)
"""


class UserError(ValueError):
    """Bad input: the message says what is wrong and what to do."""


class ConfigError(UserError):
    """An experiment config that cannot be loaded, overridden, validated or resumed, or a model
    config value this port does not implement (the message names the key)."""


class CheckpointError(UserError):
    """A model directory, safetensors file, training checkpoint or conversion source that is missing,
    truncated, corrupt or does not fit the model (the message names the file and the key)."""


class DataError(UserError):
    """A dataset, record, prompt file or cache that cannot be written or read."""


class ShardingError(UserError):
    """A mesh, rule or batch that does not fit the devices / shapes."""


class OutputError(UserError):
    """An output (a folder, a file, a workdir) that cannot be written: it equals, contains or is inside an
    input, another run holds its lock, it is a file where a folder goes, or the operating system refused
    (permission, read-only file system, disk full). Nothing has been written when it is raised."""


class NonFiniteLossError(UserError, FloatingPointError):
    """The loss (or gradient) became NaN/inf; training stopped without saving the bad state."""


class Interrupted(BaseException):
    """A stop signal ended the job at a safe point; ``str(e)`` says where and how to resume."""

    def __init__(self, message: str, signal_name: str = "SIGTERM"):
        super().__init__(message)
        self.signal_name = signal_name

    @property
    def exit_code(self) -> int:
        """``128 + signum``: what a shell reports for a process the signal ended (143, 130)."""
        import signal

        return 128 + int(getattr(signal, self.signal_name, signal.SIGTERM))
