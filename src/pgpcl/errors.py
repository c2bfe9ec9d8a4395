"""User-facing errors.

Anything a user can cause (bad config, missing data, corrupt files) raises :class:`PgpclError` with a
one-line message that names the problem and the fix. The CLI prints it without a traceback and exits 2.
"""


class PgpclError(Exception):
    """An error caused by user input; its message is shown as is, on one line."""


class ConfigError(PgpclError):
    """Invalid configuration: unknown key, wrong type, out-of-range value."""


class DataError(PgpclError):
    """Missing, partial or malformed dataset files, or an impossible split."""


class CheckpointError(PgpclError):
    """Unreadable, corrupt or mismatched checkpoint or weights file."""
