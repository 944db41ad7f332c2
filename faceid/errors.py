"""User-facing errors: the CLI prints their message (no traceback) and exits non-zero."""


class FaceidError(Exception):
    """Bad input or environment. The message names the file/key and what was expected."""


class ConfigError(FaceidError):
    """A params.yaml key is missing, unknown or of the wrong type."""


class InputError(FaceidError):
    """An input file or folder is missing, unreadable or not what the stage expects."""


class TrainingError(FaceidError):
    """Training cannot continue (e.g. NaN/inf loss)."""


class Terminated(KeyboardInterrupt):
    """A stop signal (SIGTERM) raised as an exception by the entry point (``faceid.cli.main``), like
    Ctrl-C's KeyboardInterrupt, so that ``finally`` blocks run (a local Ray is stopped, locks are
    released, temporary folders removed) before the process exits with 128 + ``signum``."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum
