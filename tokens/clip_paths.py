"""File names and data-loader settings that clip_prune.py fixes before clip_benchmark runs.

clip_benchmark builds its result file name from `--output` (default
`{dataset}_{pretrained}_{model}_{language}_{task}.json`) with the raw names. A model named
`local-dir:/path/to/model`, `hf-hub:org/name` or a `--pretrained` that is not an existing file
puts '/' into the name, and the file cannot be written after the whole evaluation has run.
`safe_outputs` fills the template itself with sanitised names (the template's own folders are
kept) and checks that the folder is writable before that run's model is even loaded.

WebDataset sets (`--dataset wds/NAME`) are read by `--num_workers` loader workers (default 4), each
taking whole shards; a worker without a shard makes webdataset stop with "No samples found".
`wds_workers` reads each set's shard count so the worker count can be capped before any work.
"""
import os
import re
from contextlib import contextmanager
from copy import copy
from typing import Callable, Iterator, List, Optional

from utils.writable import PathError, check_writable

UNSAFE = re.compile(r"[^A-Za-z0-9._+=-]+")


def slug(name: str) -> str:
    """A file-name-safe form of a model, weights or dataset name: 'local-dir:/a/b' -> 'local-dir_a_b'."""
    return UNSAFE.sub("_", str(name)).strip("._")


def output_path(template: str, model: str, pretrained: str, dataset: str, language: str, task: str) -> str:
    """clip_benchmark's --output template filled as its cli.run fills it, every name sanitised."""
    dataset_name = dataset[len("wds/"):] if dataset.startswith("wds/") else dataset
    pretrained_slug = os.path.basename(pretrained) if os.path.isfile(pretrained) else pretrained
    return template.format(model=slug(model), pretrained=slug(pretrained_slug), pretrained_full_path=slug(pretrained),
                           task=slug(task), dataset=slug(dataset_name), language=slug(language))


@contextmanager
def safe_outputs(on_run: Callable[[str], None]) -> Iterator[None]:
    """While active, every clip_benchmark evaluation writes to a sanitised, checked path; on_run(path)
    is called before the run loads its model. clip_benchmark's cli.run is wrapped, not changed."""
    from clip_benchmark import cli
    from clip_benchmark.datasets.builder import get_dataset_default_task
    original = cli.run

    def run(args):
        dataset_name = args.dataset[len("wds/"):] if args.dataset.startswith("wds/") else args.dataset
        task = get_dataset_default_task(dataset_name) if args.task == "auto" else args.task
        path = output_path(args.output, args.model, args.pretrained, args.dataset, args.language, task)
        check_writable(path, "--output")
        on_run(path)
        args = copy(args)
        args.output = path.replace("{", "{{").replace("}", "}}")  # cli.run formats it once more
        return original(args)

    cli.run = run
    try:
        yield
    finally:
        cli.run = original


def wds_shards(dataset: str, dataset_root: str, split: str = "test") -> Optional[int]:
    """Shard count of a local `wds/NAME` set (its SPLIT/nshards.txt); None for other datasets and URLs.
    Raises PathError when a local wds set has no readable shard count."""
    if not dataset.startswith("wds/") or "://" in dataset_root or dataset_root.startswith("https:"):
        return None
    name = dataset[len("wds/"):]
    root = dataset_root.format(dataset=name, dataset_cleaned=name.replace("/", "-"))
    path = os.path.join(root, split, "nshards.txt")
    try:
        with open(path) as handle:
            return int(handle.read().strip())
    except (OSError, ValueError) as exc:
        raise PathError(f"--dataset_root {root}: {dataset} needs {path} (write the set with "
                        f"python -m tokens.wds_data): {type(exc).__name__}") from None


def wds_workers(datasets: List[str], dataset_root: str, split: str, num_workers: int) -> Optional[int]:
    """The worker count to use instead of num_workers when a local wds set has fewer shards, else None."""
    counts = [n for n in (wds_shards(d, dataset_root, split) for d in datasets) if n is not None]
    if counts and min(counts) < num_workers:
        return min(counts)
    return None
