"""Errors a user can act on: printed as one line, exit code 2, before work starts."""
import math
import re
import sys
from typing import Any, Callable, Optional, Sequence, Tuple, Type

# what a CLI prints (one line on stderr) and its exit code, for an exception it expects
Outcome = Callable[[BaseException], Tuple[str, int]]


class UsageError(Exception):
    """Bad flag, bad file or bad data: the message names the flag or path."""


class CheckpointError(UsageError):
    """A checkpoint file is unreadable, foreign or inconsistent; the message names the file."""


class NumericalError(Exception):
    """The loss stopped being finite; the message names round, epoch and step."""


def require_finite(value: float, where: str, advice: str) -> float:
    """`value` when it is finite; NumericalError `<where>: loss <value> (the training diverged); <advice>`
    otherwise."""
    if not math.isfinite(value):
        raise NumericalError(f"{where}: loss {value} (the training diverged); {advice}")
    return value


def first_sentence(exc: BaseException) -> str:
    """The first sentence of an exception's message, whole, for a one-line error (torch appends long advice to
    its errors); `TypeName, a N-character message` when that sentence is over 160 characters."""
    text = " ".join(str(exc).split()) or type(exc).__name__
    sentence = re.split(r"(?<=[a-z)])\. ", text, maxsplit=1)[0].rstrip(".")
    return sentence if len(sentence) <= 160 else f"{type(exc).__name__}, a {len(text)}-character message"


def error_line(code: int) -> Outcome:
    """`error: <message>` and exit `code`."""
    return lambda exc: (f"error: {exc}", code)


def os_error_line(note: str = "") -> Outcome:
    """`error: <file>: <reason><note>`, exit 1: disk full, permissions, a vanished mount in one line."""
    def outcome(exc: BaseException) -> Tuple[str, int]:
        where = f"{exc.filename}: " if getattr(exc, "filename", None) else ""
        return f"error: {where}{exc.strerror or exc}{note}", 1
    return outcome


def run_cli(work: Callable[[], Any], report: Optional[Callable[[Any], None]] = None,
            expected: Sequence[Tuple[Type[BaseException], Outcome]] = ()) -> int:
    """A CLI's main: `work()`, then `report(result)` (outside the handling) and exit code 0.

    A UsageError from `work` prints `error: <message>` on stderr and gives exit code 2; an exception of a type
    in `expected` (checked in order, after UsageError) prints and exits as its outcome says. Anything else
    propagates with its traceback.
    """
    try:
        result = work()
    except BaseException as exc:  # noqa: B902 - KeyboardInterrupt may be expected; the rest is re-raised
        for kind, outcome in ((UsageError, error_line(2)), *expected):
            if isinstance(exc, kind):
                message, code = outcome(exc)
                # one write of the whole line: processes sharing stderr (torchrun ranks, a sweep's cells)
                # then never splice their lines (print may write the text and the newline in two calls)
                sys.stderr.write(message + "\n")
                sys.stderr.flush()
                return code
        raise
    if report is not None:
        report(result)
    return 0


def run_cli_code(work: Callable[[], int], expected: Sequence[Tuple[Type[BaseException], Outcome]] = ()) -> int:
    """`run_cli` for a `work` that returns its own exit code (a sweep, a fused group): that code when `work`
    ends normally, else the code `run_cli` gives its exception."""
    outcome = {}

    def coded() -> None:
        outcome["code"] = work()

    code = run_cli(coded, expected=expected)
    return outcome.get("code", code) if code == 0 else code
