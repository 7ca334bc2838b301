"""User-facing errors: each carries one line naming the problem and the fix."""


class FrozenPrefixError(Exception):
    """An error caused by user input; the CLI prints its message as one line and exits 2."""


class ConfigError(FrozenPrefixError, ValueError):
    """A configuration key, type or value is wrong."""


class DataError(FrozenPrefixError):
    """A data file or image cannot be read."""
