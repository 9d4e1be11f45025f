"""Print the command-line flags that reproduce a run's saved config (one per line).

    python -m utils.replay_flags <run_dir>/config.json

Used by run_scripts/resume_sweep.sh to resume runs from their own settings.
"""
import json
import sys
from typing import List

from utils.config import RunConfig

NOT_REPLAYED = {"save_dir", "resume"}  # the caller decides where and whether to resume; a branch keeps its --resume_from
NEGATED = {"progress": "--no_progress", "cuda_graph": "--no_cuda_graph"}  # fields set by a --no_ flag


def flags_for(config: RunConfig) -> List[str]:
    defaults = RunConfig()
    out: List[str] = []
    for name, value in config.to_dict().items():
        if name in NOT_REPLAYED or value is None:
            continue
        if name in NEGATED:
            out += [] if value else [NEGATED[name]]
        elif isinstance(value, bool):
            out += [f"--{name}"] if value else []
        elif isinstance(value, list):
            out += [f"--{name}", ",".join(map(str, value))] if value else []
        elif value != getattr(defaults, name) or name in ("arch", "dataset", "struct", "rate"):
            out += [f"--{name}", str(value)]
    return out


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        print("usage: python -m utils.replay_flags <run_dir>/config.json", file=sys.stderr)
        return 2
    try:
        with open(argv[0]) as f:
            record = json.load(f)
    except (OSError, json.JSONDecodeError) as exc:
        print(f"error: {argv[0]}: not a readable config.json ({exc})", file=sys.stderr)
        return 2
    print("\n".join(flags_for(RunConfig.from_dict(record["config"]))))
    return 0


if __name__ == "__main__":
    sys.exit(main())
