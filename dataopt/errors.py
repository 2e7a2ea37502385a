"""Errors that reach the user as one readable message (exit code 2), not a traceback."""


class UserError(Exception):
    """A mistake the user can fix: bad params, a missing path, unusable data. CLI exit code 2."""

    exit_code = 2


class ConfigError(UserError):
    """params.yaml (or an override) is invalid."""


class DataError(UserError):
    """Input data cannot be used (no valid sample left, too many quarantined, wrong schema)."""


class MissingArtifactError(UserError):
    """A stage needs the output of an earlier stage that has not been produced."""


class DivergedError(UserError):
    """Training produced a non-finite loss or non-finite weights (a learning rate far too high)."""


class DataWarning(UserWarning):
    """A run that works but probably not as meant (e.g. a plan that keeps no sample of some class);
    the ``dataopt`` command prints it as one line ``dataopt: warning: ...``."""
