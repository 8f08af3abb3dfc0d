"""The one exception type fimaq raises for bad input (the CLI prints it as a single line), and the
interruption raised by fimaq's SIGINT/SIGTERM handler."""

from collections.abc import Iterator
from contextlib import contextmanager


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


def require_choice(name: str, value: object, allowed: tuple[str, ...]) -> None:
    """A FimaqError naming ``name`` unless ``value`` is one of ``allowed``."""
    if value not in allowed:
        raise FimaqError(f"{name} must be one of {', '.join(allowed)}; got {value!r}")


def require_fraction(name: str, value: object, closed_right: bool = True) -> None:
    """A FimaqError naming ``name`` unless ``value`` is a number in [0, 1] (or [0, 1))."""
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and 0 <= value
    ok = ok and (value <= 1 if closed_right else value < 1)
    if not ok:
        raise FimaqError(f"{name} must be a number in [0, 1{']' if closed_right else ')'}, got {value!r}")


def one_line(exc: BaseException, limit: int = 200) -> str:
    """``"TypeName: message"`` of ``exc`` on one line, for wrapping a library error into a FimaqError.

    Multi-line library messages (torch's weights-only refusal, YAML parser errors) keep their most
    telling line: the one naming a refused global if there is one, else the first non-empty line.

    Args:
        exc: the exception to describe.
        limit: longest message kept (longer ones are cut after their first sentence, or end with "...").
    """
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    telling = [line for line in lines if "GLOBAL" in line or "Unsupported global" in line]
    text = (telling or lines or [""])[0]
    if len(text) > limit:
        end = text.find(". ", 0, limit)  # keep whole sentences where one fits
        text = text[: end + 1] if end > 0 else text[: limit - 3] + "..."
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


class Interrupted(BaseException):
    """Raised by fimaq's SIGINT/SIGTERM handlers (a BaseException, so that no ``except Exception``
    swallows it); ``where`` says what was interrupted, filled in by the stage that was running."""

    def __init__(self, signum: int, where: str = "") -> None:
        super().__init__(signum)
        self.signum = signum
        self.where = where


_deferred: list[int | None] = []  # one entry per open defer_interrupts block: the signal held back


def raise_interrupted(signum: int, frame: object = None) -> None:
    """SIGINT/SIGTERM handler: raise :class:`Interrupted` now, or at the end of the innermost
    :func:`defer_interrupts` block when one is open."""
    if _deferred:
        _deferred[-1] = _deferred[-1] or signum
        return
    raise Interrupted(signum)


@contextmanager
def defer_interrupts() -> Iterator[None]:
    """Hold back an interruption while the block runs (bookkeeping that must finish as a whole, such
    as recording a finished unit and writing the state), then raise it."""
    _deferred.append(None)
    try:
        yield
    finally:
        held = _deferred.pop()
    if held is not None:
        raise_interrupted(held)
