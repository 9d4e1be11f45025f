"""Writing a benchmark's results: one atomic JSON file, and a line saying where it went."""
from utils.checkpoint import atomic_write_json


def save(results: dict, path: str, indent: int = 2) -> int:
    """Write `results` to `path` (atomic JSON), say so; returns exit code 0."""
    atomic_write_json(path, results, indent=indent)
    print(f"wrote {path}")
    return 0
