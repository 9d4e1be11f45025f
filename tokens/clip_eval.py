"""clip_benchmark zero-shot evaluation with training-free anchor token pruning (SPEC section 4).

clip_benchmark is used as installed, not forked: this module registers a model
type `open_clip_pruned` in `clip_benchmark.models.TYPE2FUNC` / `MODEL_TYPES`
(the eval CLI reads its `--model_type` choices from that list when it builds its
parser) and then hands the command line to `clip_benchmark.cli.main()`. The
loader builds the open_clip model, attaches pruning / attention recording and
timing hooks; afterwards the measured throughput and token counts are added to
clip_benchmark's result JSON under "token_pruning" (when --output is a plain
path) and printed.

    python clip_prune.py --model ViT-B-32 --pretrained openai --dataset cifar10 \
        --dataset_root data --task zeroshot_classification --output pruned.json \
        --enable_pruning --k_anchors 10 --top_m 50 --alpha 0.5
"""
import argparse
import json
import os
import sys
from dataclasses import dataclass
from typing import TYPE_CHECKING, List, Optional

if TYPE_CHECKING:  # names for annotations; Session.load imports what it needs when a model is built
    from tokens.patching import PruningHandle
    from tokens.stats import EncoderStats

from tokens.clip_paths import safe_outputs, wds_workers
from tokens.clip_weights import NO_WEIGHTS, check_pretrained, load_error
from utils.writable import PathError, check_writable

MODEL_TYPE = "open_clip_pruned"


class CliError(Exception):
    """A bad flag value: printed as one line naming the flag, exit code 2."""


class _OneLineParser(argparse.ArgumentParser):
    def error(self, message: str):
        raise CliError(message)


def build_parser() -> argparse.ArgumentParser:
    p = _OneLineParser(prog="clip_prune.py", allow_abbrev=False,
                       description="clip_benchmark eval with training-free anchor token pruning of the image encoder.",
                       epilog="Every other flag (--model, --pretrained, --dataset, --dataset_root, --task, --output, "
                              "--batch_size, ...) goes to `clip_benchmark eval`; see `clip_benchmark eval -h`.")
    p.add_argument("--enable_pruning", action="store_true", help="prune image tokens (default: baseline)")
    p.add_argument("--k_anchors", type=int, default=10, help="anchors: tokens with the highest CLS attention")
    p.add_argument("--top_m", type=int, default=50, help="further tokens kept by importance/diversity score")
    p.add_argument("--alpha", type=float, default=0.5, help="score = alpha*importance + (1-alpha)*diversity")
    p.add_argument("--start_block", type=int, default=1, help="first block (0-based) that prunes")
    p.add_argument("--extract_attention", action="store_true", help="save per-block CLS attention and kept tokens")
    p.add_argument("--attention_output", default="cls_attention.pt", help="file for --extract_attention (.pt)")
    return p


def _benchmark_view(rest: List[str]) -> argparse.Namespace:
    """The few clip_benchmark flags this wrapper needs to read (it passes all of them on unchanged)."""
    p = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    p.add_argument("--model", nargs="+", default=["ViT-B-32-quickgelu"])
    p.add_argument("--pretrained", nargs="+", default=["laion400m_e32"])
    p.add_argument("--pretrained_model", nargs="+", default=[])
    p.add_argument("--dataset", nargs="+", default=["cifar10"])
    p.add_argument("--dataset_root", default="root")
    p.add_argument("--split", "--test_split", dest="split", default="test")
    p.add_argument("--num_workers", type=int, default=4)
    p.add_argument("--model_cache_dir", default=None)
    p.add_argument("--output", default="{dataset}_{pretrained}_{model}_{language}_{task}.json")
    p.add_argument("--model_type", default=None)
    return p.parse_known_args(rest)[0]


def model_token_count(model_name: str) -> Optional[int]:
    """Tokens of an open_clip ViT from its config (CLS + patches), or None if it cannot be told."""
    import open_clip
    if model_name.startswith("local-dir:"):
        path = os.path.join(model_name[len("local-dir:"):], "open_clip_config.json")
        if not os.path.isfile(path):
            return None
        with open(path) as handle:
            config = json.load(handle).get("model_cfg", {})
    else:
        config = open_clip.get_model_config(model_name) or {}
    vision = config.get("vision_cfg", {})
    size, patch = vision.get("image_size"), vision.get("patch_size")
    if not isinstance(size, int) or not isinstance(patch, int):
        return None
    return (size // patch) ** 2 + 1


def check_inputs(options: argparse.Namespace, view: argparse.Namespace, weights: bool = True) -> List[str]:
    """Paths and weights, before any work: a plain --output and --attention_output must be writable,
    named weights must be obtainable (tokens/clip_weights.py). Returns extra clip_benchmark flags
    (a --num_workers capped at the shard count of a local wds set)."""
    try:
        if "{" not in view.output:
            check_writable(view.output, "--output")
        if options.extract_attention:
            check_writable(options.attention_output, "--attention_output", create_folders=True)
        workers = wds_workers(view.dataset, view.dataset_root, view.split, view.num_workers)
    except PathError as exc:
        raise CliError(str(exc)) from None
    if weights and not view.pretrained_model:  # open_clip names; other --model_type loaders have their own
        for model in view.model:
            for pretrained in view.pretrained:
                problem = check_pretrained(model, pretrained, view.model_cache_dir)
                if problem:
                    raise CliError(f"--pretrained {pretrained}: {problem}")
    if workers is None:
        return []
    print(f"clip_prune.py: --num_workers {view.num_workers} -> {workers}: the WebDataset set has {workers} "
          f"shard(s) and a loader worker without one finds no samples", file=sys.stderr)
    return ["--num_workers", str(workers)]


def validate(options: argparse.Namespace, models: List[str]) -> None:
    if options.k_anchors < 0:
        raise CliError(f"--k_anchors must be >= 0, got {options.k_anchors}")
    if options.top_m < 0:
        raise CliError(f"--top_m must be >= 0, got {options.top_m}")
    if not 0.0 <= options.alpha <= 1.0:
        raise CliError(f"--alpha must be in [0, 1], got {options.alpha}")
    if options.start_block < 0:
        raise CliError(f"--start_block must be >= 0, got {options.start_block}")
    if not options.enable_pruning:
        return
    for name in models:
        tokens = model_token_count(name)
        if tokens is not None and options.k_anchors + options.top_m + 1 >= tokens:
            raise CliError(f"--k_anchors {options.k_anchors} + --top_m {options.top_m} + 1 (CLS) = "
                           f"{options.k_anchors + options.top_m + 1} must be below the {tokens} tokens of {name}")


@dataclass
class Run:
    model_name: str
    pretrained: str
    stats: "EncoderStats"
    handle: "Optional[PruningHandle]"
    output: str  # clip_benchmark's result file for this run (sanitised, tokens/clip_paths.py)


class Session:
    """The loader clip_benchmark calls, and what each loaded model measured."""

    def __init__(self, options: argparse.Namespace):
        self.options = options
        self.runs: List[Run] = []
        self.output = ""  # set by safe_outputs before clip_benchmark loads each run's model

    def load(self, model_name: str, pretrained: str, cache_dir: Optional[str] = None, device="cpu"):
        import open_clip
        from tokens.backends import find_target
        from tokens.patching import apply_pruning_to_model
        from tokens.stats import EncoderStats
        weights = None if pretrained in NO_WEIGHTS else pretrained
        try:
            model, _, transform = open_clip.create_model_and_transforms(model_name, pretrained=weights,
                                                                        cache_dir=cache_dir)
        except (RuntimeError, OSError, ValueError, KeyError, EOFError) as exc:
            raise CliError(f"--pretrained {pretrained}: {load_error(model_name, str(pretrained), exc)}") from None
        model = model.to(device).eval()
        tokenizer = open_clip.get_tokenizer(model_name)
        o = self.options
        try:
            stats = EncoderStats(find_target(model))
            handle = None
            if o.enable_pruning or o.extract_attention:
                handle = apply_pruning_to_model(model, o.k_anchors, o.top_m, o.alpha, o.start_block,
                                                prune=o.enable_pruning, record=o.extract_attention)
                stats.handle = handle  # batches that capture a scoring graph count as warm-up
        except (TypeError, ValueError) as exc:
            raise CliError(f"--model {model_name}: {exc}") from None
        self.runs.append(Run(model_name, str(pretrained), stats, handle, self.output))
        return model, transform, tokenizer

    def attention_path(self, index: int) -> str:
        if index == 0:
            return self.options.attention_output
        stem, ext = os.path.splitext(self.options.attention_output)
        return f"{stem}.{index}{ext or '.pt'}"

    def finish(self) -> List[dict]:
        o, summaries = self.options, []
        for index, run in enumerate(self.runs):
            summary = {"enabled": bool(o.enable_pruning), "k_anchors": o.k_anchors, "top_m": o.top_m,
                       "alpha": o.alpha, "start_block": o.start_block, **run.stats.summary()}
            if run.handle is not None and run.handle.recorder is not None:
                path = self.attention_path(index)
                meta = {key: summary[key] for key in ("enabled", "k_anchors", "top_m", "alpha", "start_block")}
                meta.update(model=run.model_name, pretrained=run.pretrained, pruning=meta.pop("enabled"),
                            num_prefix_tokens=run.handle.target.num_prefix_tokens)
                run.handle.recorder.save(path, meta)
                summary["attention_output"] = path
            summaries.append(summary)
            print(f"[anchor pruning] {run.model_name}: pruning={'on' if o.enable_pruning else 'off'} "
                  f"tokens/block={summary['tokens_per_block']} images/s={summary['images_per_s']} (steady state, "
                  f"{summary['steady_batches']} batches; {summary['overall_images_per_s']} with "
                  f"{summary['warmup_batches']} warm-up and {summary['partial_batches']} partial batches)")
            if run.output and os.path.isfile(run.output):
                add_to_result(run.output, summary)
        self.close()
        return summaries

    def close(self) -> None:
        """Detach pruning and hooks from every loaded model (also after a failed evaluation)."""
        for run in self.runs:
            if run.handle is not None:
                run.handle.restore()
            run.stats.close()


def add_to_result(path: str, summary: dict) -> None:
    with open(path) as handle:
        result = json.load(handle)
    result["token_pruning"] = summary
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as handle:
        json.dump(result, handle)
    os.replace(tmp, path)


def register(session: Session) -> None:
    """Make `--model_type open_clip_pruned` a choice of clip_benchmark's eval CLI."""
    from clip_benchmark import models
    models.TYPE2FUNC[MODEL_TYPE] = session.load
    if MODEL_TYPE not in models.MODEL_TYPES:
        models.MODEL_TYPES.append(MODEL_TYPE)


def require_packages() -> None:
    """Raise CliError (one line) when open_clip or clip_benchmark is not installed."""
    import importlib
    missing = []
    for name in ("open_clip", "clip_benchmark"):
        try:
            importlib.import_module(name)
        except ImportError:
            missing.append(name)
    if missing:
        raise CliError(f"{' and '.join(missing)} not installed; pip install '.[tokens]' "
                       f"(open_clip_torch, clip_benchmark)")


def run(argv: List[str]) -> List[dict]:
    options, rest = build_parser().parse_known_args(argv)
    require_packages()
    if rest and rest[0] == "build":  # clip_benchmark's CSV builder: nothing to prune
        _call_benchmark(rest)
        return []
    rest = rest[1:] if rest and rest[0] == "eval" else rest
    view = _benchmark_view(rest)
    validate(options, [] if view.pretrained_model else view.model)
    ours = view.model_type in (None, MODEL_TYPE)
    if not ours and (options.enable_pruning or options.extract_attention):
        raise CliError(f"--model_type {view.model_type}: pruning needs --model_type {MODEL_TYPE} (the default)")
    rest = rest + check_inputs(options, view, weights=ours)
    session = Session(options)
    register(session)
    model_type = [] if view.model_type else ["--model_type", MODEL_TYPE]
    try:
        with safe_outputs(lambda path: setattr(session, "output", path)):
            _call_benchmark(["eval", *rest, *model_type])
    except PathError as exc:
        session.close()
        raise CliError(str(exc)) from None
    except BaseException:
        session.close()
        raise
    return session.finish()


def _call_benchmark(args: List[str]) -> int:
    from clip_benchmark import cli
    from tokens.compat import benchmark_fixes
    saved = sys.argv
    sys.argv = ["clip_benchmark", *args]
    try:
        with benchmark_fixes():
            cli.main()
    finally:
        sys.argv = saved
    return 0


def main(argv: Optional[List[str]] = None) -> int:
    try:
        run(sys.argv[1:] if argv is None else list(argv))
    except CliError as exc:
        print(f"clip_prune.py: error: {exc}", file=sys.stderr)
        return 2
    return 0
