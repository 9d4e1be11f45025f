"""The one reader of the runner's plain-text JSON records (lineage.json, sweep.json, jobs.json, arch.json,
config.json, compact round reports, the feature-cache index).

It only reads and says, in one line naming the file, why it could not; each caller keeps its own policy on
top (a missing file that means "none yet", a schema check, a warning instead of an error).
"""
import json
from typing import Type

from utils.errors import CheckpointError, first_sentence

JSON_KINDS = {list: "array", str: "string", int: "number", float: "number", bool: "boolean", type(None): "null"}


def read_json(path: str, what: str, error: Type[Exception] = CheckpointError) -> dict:
    """The JSON object in the file `path`.

    `what` names what the file should be, read after "a" (e.g. "lineage file"). Raises `error`
    (CheckpointError unless given: UsageError, ValueError, ...) with one line naming `path`:
      `<path>: no such file (expected a <what>)`;
      `<path>: unreadable <what> (<exception type>: <its first sentence>)` for a folder, no permission,
      bad UTF-8 or bad JSON;
      `<path>: not a <what> (a JSON <array|string|number|boolean|null>, not an object)`.
    """
    try:
        with open(path, encoding="utf-8") as f:
            value = json.load(f)
    except FileNotFoundError:
        raise error(f"{path}: no such file (expected a {what})") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise error(f"{path}: unreadable {what} ({type(exc).__name__}: {first_sentence(exc)})") from None
    if not isinstance(value, dict):
        raise error(f"{path}: not a {what} (a JSON {JSON_KINDS.get(type(value), 'value')}, not an object)")
    return value
