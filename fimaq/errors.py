"""The one exception type fimaq raises for bad input; the CLI prints it as a single line."""


class FimaqError(ValueError):
    """A user-facing problem (bad config, missing file, incompatible checkpoint, bad data)."""
