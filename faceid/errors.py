"""User-facing errors: the CLI prints their message (no traceback) and exits non-zero."""


class FaceidError(Exception):
    """Bad input or environment. The message names the file/key and what was expected."""


class ConfigError(FaceidError):
    """A params.yaml key is missing, unknown or of the wrong type."""


class InputError(FaceidError):
    """An input file or folder is missing, unreadable or not what the stage expects."""


class TrainingError(FaceidError):
    """Training cannot continue (e.g. NaN/inf loss)."""
