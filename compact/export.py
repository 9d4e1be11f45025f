"""export_compact.py's work: checkpoint -> compact model, verified, measured, written atomically.

Order: every check first (the out dir, the checkpoint, the arch), then the compact model, its
verification (max |logit difference| to the masked model on 256 test images, fp32 on the CPU; above
TOLERANCE nothing is written and the exit code is 1), the measurement (structured checkpoints), and
last the writes: DIR is filled as a temp dir beside it and renamed into place, then
<run dir>/compact/round_<k>.json is written atomically (the report report_runs.py reads).
"""
import json
import os
import re
import shutil
import tempfile
from dataclasses import dataclass
from typing import Optional

import torch

from compact import files
from compact.families import compact_copy, family_of
from compact.measure import DTYPES, format_table, parameter_count, time_variant, timed_model
from compact.source import load_source, max_logit_difference, verification_images
from pruners.masks import remaining_fraction
from utils import checkpoint, paths
from utils.errors import UsageError
from utils.flops import flops_per_image

TOLERANCE = 1e-4
NO_SPEEDUP = ("element-wise masks: no speedup expected from element-wise sparsity (the tensors keep their dense "
              "shapes); exported dense-shaped with the masked weights, sparsity reported only")


class CompactMismatch(Exception):
    """The compact model's logits differ from the masked model's by more than TOLERANCE (exit 1)."""


@dataclass(frozen=True)
class Options:
    checkpoint: str
    out: str
    device: str = "cpu"
    runs: int = 50
    batch: int = 256
    compile: bool = False
    dtype: str = "fp32"
    data: Optional[str] = None


def check_options(options: Options) -> torch.device:
    """UsageError naming the flag or path for bad options; returns the timing device."""
    if os.path.lexists(options.out) and (not os.path.isdir(options.out) or os.listdir(options.out)):
        kind = "a directory that is not empty" if os.path.isdir(options.out) else "not a directory"
        raise UsageError(f"--out {options.out}: exists and is {kind}; give a new or empty directory")
    if options.runs < 1 or options.batch < 1:
        raise UsageError(f"--runs {options.runs} / --batch {options.batch}: must be at least 1")
    if options.dtype not in DTYPES:
        raise UsageError(f"--dtype {options.dtype}: choose from {', '.join(DTYPES)}")
    try:
        device = torch.device(options.device)
    except RuntimeError:
        raise UsageError(f"--device {options.device}: not a device (cpu, cuda, cuda:N)") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"--device {options.device}: CUDA is not available here")
    if device.type not in ("cpu", "cuda"):
        raise UsageError(f"--device {options.device}: choose cpu or cuda")
    return device


def _variant(model, input_shape, options: Options, device, nonzero: Optional[int] = None) -> dict:
    out = {"params": parameter_count(model), "flops_per_image": flops_per_image(model, input_shape)}
    if nonzero is not None:
        out["nonzero_params"] = nonzero
    runner = timed_model(model, device, DTYPES[options.dtype], options.compile)
    out.update(time_variant(runner, input_shape, device, DTYPES[options.dtype], options.runs, options.batch))
    return out


def _write_dir(out: str, arch: dict, weights: bytes, report: dict) -> None:
    parent = os.path.dirname(os.path.abspath(out))
    os.makedirs(parent, exist_ok=True)
    staging = tempfile.mkdtemp(prefix=".tmp-compact-", dir=parent)
    try:
        for name, payload in ((files.WEIGHTS_FILE, weights),
                              (files.ARCH_FILE, (readable_json(arch) + "\n").encode()),
                              (files.REPORT_FILE, (json.dumps(report, indent=1) + "\n").encode())):
            checkpoint.atomic_write_bytes(os.path.join(staging, name), payload)
        os.chmod(staging, 0o755)
        if os.path.isdir(out):
            os.rmdir(out)  # empty (checked before any work); rename cannot replace it everywhere
        os.rename(staging, out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def export(options: Options, log=print) -> dict:
    """Run the whole export; returns the report. Raises UsageError (bad input, exit 2) or
    CompactMismatch (verification failed, exit 1); nothing is written in either case."""
    device = check_options(options)
    source = load_source(options.checkpoint)
    family = family_of(source.masked)
    arch_name = source.config["arch"]
    if family is None:
        raise UsageError(f"{options.checkpoint}: --arch {arch_name} is not compacted (res20s, res56s, res18 "
                         f"and timm ViTs are)")
    images, origin = verification_images(source.config, options.data)
    input_shape = tuple(images.shape[1:])
    compact, layout = compact_copy(source.masked, family, input_shape, structured=source.structured)
    difference = max_logit_difference(source.masked, compact, images)
    log(f"verification: max |logit difference| compact vs masked = {difference:.3e} over {origin} "
        f"(fp32, CPU; tolerance {TOLERANCE:g})")
    if not difference <= TOLERANCE:
        raise CompactMismatch(f"{options.checkpoint}: compact model differs from the masked one by "
                              f"{difference:.6g} > {TOLERANCE:g} (max |logit difference|); nothing written")
    masks = source.payload["masks"]
    report = {"round": source.round, "device": str(device), "dtype": options.dtype, "compile": options.compile,
              "out_dir": os.path.abspath(options.out), "checkpoint": os.path.abspath(options.checkpoint),
              "struct": source.config.get("struct"), "vit_structured": bool(source.config.get("vit_structured")),
              "structured": source.structured, "sparsity": 1.0 - remaining_fraction(masks),
              "max_abs_logit_diff": difference, "verified_on": origin, "runs": options.runs, "batch": options.batch}
    if source.structured:
        nonzero = sum(int((p != 0).sum()) for p in source.masked.parameters())
        report["variants"] = {"dense": _variant(source.dense, input_shape, options, device),
                              "masked": _variant(source.masked, input_shape, options, device, nonzero),
                              "compact": _variant(compact, input_shape, options, device)}
        log(format_table(report["variants"], options.batch))
    else:
        report["note"] = NO_SPEEDUP
        log(f"{NO_SPEEDUP}: sparsity {100 * report['sparsity']:.2f}%")
    arch = arch_record(source, family.name, input_shape, layout)
    _write_dir(options.out, arch, files.weights_bytes(compact), report)
    if source.structured:
        path = paths.compact_round_report(os.path.dirname(os.path.abspath(options.checkpoint)), source.round)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        checkpoint.atomic_write_json(path, report, indent=1)
        report["round_report"] = path
    log(f"wrote {options.out}/{{{files.ARCH_FILE}, {files.WEIGHTS_FILE}, {files.REPORT_FILE}}}"
        + (f" and {report['round_report']}" if source.structured else ""))
    return report


def arch_record(source, family: str, input_shape, layout: dict) -> dict:
    """arch.json: what load_compact needs (arch, classes, family, input shape, plan) and where it came from."""
    return {"format": files.FORMAT, "arch": source.config["arch"], "num_classes": source.num_classes,
            "family": family, "input_shape": list(input_shape), "dataset": source.config["dataset"],
            "plan": layout, "widths": widths(layout),
            "source": {"checkpoint": os.path.abspath(source.path), "sha256": checkpoint.sha256_of(source.path),
                       "round": source.round, "struct": source.config.get("struct"),
                       "vit_structured": bool(source.config.get("vit_structured"))}}


def readable_json(value) -> str:
    """Indented JSON with lists of numbers kept on one line."""
    text = json.dumps(value, indent=1)
    return re.sub(r"\[\s+([-\d.,\s]+?)\s+\]", lambda m: "[" + re.sub(r"\s+", " ", m.group(1)) + "]", text)


def widths(layout: dict) -> dict:
    """{layer / block: "kept/total"} for people reading arch.json."""
    return {name: f"{len(spec['keep'])}/{spec.get('out_channels', spec.get('num_heads', spec.get('hidden')))}"
            for entries in layout.values() for name, spec in entries.items()}
