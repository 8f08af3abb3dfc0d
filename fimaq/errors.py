"""The one exception type fimaq raises for bad input; the CLI prints it as a single line."""


class FimaqError(ValueError):
    """A user-facing problem (bad config, missing file, incompatible checkpoint, bad data)."""


def require_int(name: str, value: object, minimum: int, maximum: int | None = None, note: str = "") -> int:
    """``value`` as an int in ``[minimum, maximum]``, else a FimaqError naming ``name``."""
    if (
        isinstance(value, bool)
        or not isinstance(value, int)
        or value < minimum
        or (maximum is not None and value > maximum)
    ):
        bound = f"between {minimum} and {maximum}" if maximum is not None else f">= {minimum}"
        raise FimaqError(f"{name} must be an integer {bound}{note}, got {value!r}")
    return value
