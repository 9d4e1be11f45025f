"""Pure grid expansion: `--grid key=v1,v2` texts -> ordered cells -> names and runner commands.

No files, no processes: everything here is a function of its arguments, so the same grid gives
the same cells, names and commands on every machine. The cartesian product follows the order the
`--grid` flags were given (the last key varies fastest), like nested shell loops.
"""
import hashlib
import itertools
import re
from typing import Dict, List, Sequence

from utils.errors import UsageError

Grid = Dict[str, List[str]]  # runner flag name (no dashes) -> its values, as given

RUNNER = "main_imp_fillback.py"
BOOLEAN_VALUES = ("true", "false")  # a store_true flag as a grid key: present / absent
_KEY = re.compile(r"^[A-Za-z][A-Za-z0-9_]*$")
_UNSAFE = re.compile(r"[^A-Za-z0-9.+-]")  # what a cell name may not hold ('_' joins the key-value pairs)
MAX_NAME = 120  # longer names end in a digest of the full one, so file systems with 255-byte names cope


def parse_grid(texts: Sequence[str]) -> Grid:
    """`["rate=0.2,0.3", "seed=1"]` -> `{"rate": ["0.2", "0.3"], "seed": ["1"]}` (order kept).

    A value that needs a comma (--decreasing_lr) is written with spaces: `decreasing_lr=60 90`.
    Raises UsageError naming the --grid for a missing '=', an empty key or value, a repeated key or value.
    """
    grid: Grid = {}
    for text in texts:
        key, sep, values = text.partition("=")
        key = key.strip().lstrip("-")
        if not sep or not _KEY.match(key):
            raise UsageError(f"--grid {text}: expected key=value1,value2,... with a runner flag name as key "
                             f"(e.g. --grid rate=0.2,0.3)")
        items = [v.strip() for v in values.split(",")]
        if not all(items):
            raise UsageError(f"--grid {text}: empty value (values are separated by single commas)")
        if key in grid:
            raise UsageError(f"--grid {text}: key {key} is given twice; put all its values in one --grid")
        repeated = sorted({v for v in items if items.count(v) > 1})
        if repeated:
            raise UsageError(f"--grid {text}: value {repeated[0]} is given twice")
        grid[key] = items
    return grid


def grid_text(key: str, grid: Grid) -> str:
    """How the user wrote one --grid (for messages)."""
    return f"--grid {key}={','.join(grid[key])}"


def expand(grid: Grid) -> List[Dict[str, str]]:
    """The cartesian product of the grid's values, one {key: value} per cell, the last key varying fastest.
    An empty grid is one cell with no values."""
    keys = list(grid)
    return [dict(zip(keys, combo)) for combo in itertools.product(*(grid[k] for k in keys))]


def cell_name(values: Dict[str, str]) -> str:
    """`{"criteria": "remain", "rate": "0.2"}` -> `criteria-remain_rate-0.2`: keys in grid order, characters
    outside [A-Za-z0-9.+-] of a value replaced by '-'. Names are never parsed back (sweep.json keeps the
    values); distinct values that map to one name are refused by `check_unique_names`."""
    name = "_".join(f"{key}-{_UNSAFE.sub('-', value)}" for key, value in values.items()) or "cell"
    if len(name) > MAX_NAME:
        name = f"{name[:MAX_NAME - 13]}_{hashlib.sha256(name.encode()).hexdigest()[:12]}"
    return name


def check_unique_names(cells: Sequence[Dict[str, str]]) -> None:
    """UsageError when two cells of a grid get the same name (values differing only in unsafe characters)."""
    seen: Dict[str, Dict[str, str]] = {}
    for values in cells:
        name = cell_name(values)
        if name in seen:
            raise UsageError(f"--grid: cells {seen[name]} and {values} would share the run dir name {name}; "
                             f"write the values differently")
        seen[name] = values


def value_flags(values: Dict[str, str], booleans: Sequence[str] = ()) -> List[str]:
    """The runner flags of a cell's values: `--key value`, or for a boolean key `--key` (true) / nothing
    (false). A boolean value other than true/false raises UsageError naming the --grid."""
    flags: List[str] = []
    for key, value in values.items():
        if key in booleans:
            if value.lower() not in BOOLEAN_VALUES:
                raise UsageError(f"--grid {key}={value}: --{key} is an on/off flag; its grid values are "
                                 f"true and false")
            flags += [f"--{key}"] if value.lower() == "true" else []
        else:
            flags += [f"--{key}", value]
    return flags


def cell_command(runner_flags: Sequence[str], values: Dict[str, str], save_dir: str,
                 booleans: Sequence[str] = ()) -> List[str]:
    """`python main_imp_fillback.py <runner flags> <grid flags> --save_dir <save_dir> --resume`: a cell's command.
    --resume is always passed: the runner starts a run dir without checkpoints from round 0, continues an
    interrupted one and says 'nothing to run' for a finished one."""
    return ["python", RUNNER, *runner_flags, *value_flags(values, booleans), "--save_dir", save_dir, "--resume"]
