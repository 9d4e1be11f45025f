"""The Triton grouped-conv kernels of the fused route's `triton` layout (training/fused/triton_conv.py, _op.py):
equal to torch's conv2d in value and gradient, deterministic, compilable without a graph break, and equal to
the default layout inside a fused res20s — run by Triton's interpreter on the CPU (tests/triton_interpreted_checks.py
in a subprocess: TRITON_INTERPRET=1 must be set before triton is imported). On a GPU the layout tuner times them
against cuDNN (tests/test_gpu_fused.py)."""
import json
import os
import subprocess
import sys

import pytest
import torch

pytest.importorskip("triton")
from training.fused import triton_conv as kernels  # noqa: E402
from training.fused.triton_conv_op import conv_supported, grouped_conv2d  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def interpreted():
    env = dict(os.environ, TRITON_INTERPRET="1", OMP_NUM_THREADS="1")
    done = subprocess.run([sys.executable, os.path.join(ROOT, "tests", "triton_interpreted_checks.py")],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_kernels_equal_torch_conv2d_in_value_and_gradient(interpreted):
    # fp32 kernels against a float64 reference: 3x3, strided and widening, 1x1 strided, an NCHW input, 5x5
    # on an odd side, stride 2 on an odd side, stride 3 unpadded, a weight gradient summed in two pixel ranges;
    # measured within 3e-7 of each reference's largest entry (fp32 sums of up to 8,192 products)
    names = {key.split(".")[0] for key in interpreted if "." in key and not key.startswith(("layout", "fused"))}
    assert len(names) == 8
    for name in names:
        for part in ("forward", "grad_input", "grad_weight"):
            assert interpreted[f"{name}.{part}"] <= 2e-6, (name, part)
        assert interpreted[f"{name}.grad_weight_repeat_bitwise"] == 0  # partial sums added in a fixed order


def test_layout_conv_on_triton_equals_its_default_eager_and_compiled(interpreted):
    assert interpreted["layouts_offered"] == 3  # the fourth layout, offered for a 2-group conv
    for label in ("eager", "compiled"):  # compiled: torch.compile(fullgraph=True) -- no graph break
        assert interpreted[f"layout_{label}.forward"] <= 2e-6
        assert interpreted[f"layout_{label}.grads"] <= 2e-5  # input, weight and bias gradients
        assert interpreted[f"layout_{label}.channels_last_out"] == 1.0
    assert interpreted["opcheck_failures"] == 0  # schema, fake tensor rule, autograd registration


def test_fused_res20s_on_triton_equals_the_default_layout(interpreted):
    assert interpreted["fused_convs_on_triton"] == 20  # all but the stem (3 input channels a cell)
    assert interpreted["fused_logits"] <= 2e-6
    assert interpreted["fused_grads_relative"] <= 2e-5


@pytest.mark.parametrize("pixels,programs", [(131072, 72), (8192, 72), (32768, 8), (50, 18), (4608, 2), (8192, 2), (257, 1)])
def test_pixel_splits_cover_every_pixel_once(pixels, programs):
    splits, rows = kernels.pixel_splits(pixels, programs)
    assert rows % kernels.GRAD_WEIGHT_BLOCK == 0 and splits * rows >= pixels > (splits - 1) * rows  # none empty
    assert splits * programs <= max(kernels.GRAD_WEIGHT_PROGRAMS + programs, programs)
    assert rows >= min(kernels.MIN_SPLIT_ROWS, pixels)  # the fp32 partial sums stay a fraction of the inputs
    assert kernels.pixel_splits(131072, 72) == (15, 8832)  # 8 groups x 9 taps: about 1,024 programs
    assert kernels.pixel_splits(8192, 72) == (2, 4096)  # 8x8 images: ranges no shorter than MIN_SPLIT_ROWS
    assert kernels.pixel_splits(8191, 72) == (1, 8192)


def test_supported_shapes():
    ok = dict(groups=8, dilation=(1, 1), padding_mode="zeros")
    assert kernels.supported_shape((8 * 32, 16, 3, 3), **ok)
    assert kernels.supported_shape((2 * 128, 64, 1, 1), **ok)
    assert not kernels.supported_shape((8 * 16, 3, 3, 3), **ok)  # a stem: 3 input channels a group
    assert not kernels.supported_shape((8 * 24, 16, 3, 3), **ok)  # 24 output channels a group
    assert not kernels.supported_shape((8 * 16, 16, 9, 9), **ok)  # a kernel over MAX_KERNEL
    assert not kernels.supported_shape((8 * 16, 16, 3, 3), 8, (2, 2), "zeros")
    assert not kernels.supported_shape((8 * 16, 16, 3, 3), 8, (1, 1), "reflect")


def test_grouped_conv2d_refuses_what_it_cannot_compute():
    x = torch.randn(1, 32, 4, 4)
    with pytest.raises(ValueError, match=r"weight \(32, 8, 3, 3\) with 4 groups: the kernels take per-group channels"):
        grouped_conv2d(torch.randn(1, 32, 4, 4), torch.randn(32, 8, 3, 3), None, (1, 1), (1, 1), 4)
    with pytest.raises(ValueError, match="x is torch.float32, weight torch.bfloat16: cast them to one dtype"):
        grouped_conv2d(x, torch.randn(32, 16, 3, 3, dtype=torch.bfloat16), None, (1, 1), (1, 1), 2)


def test_named_padding_is_not_offered(monkeypatch):
    monkeypatch.setattr(kernels, "INTERPRETED", True)  # as if the kernels could run here: only the shape decides
    assert conv_supported(torch.nn.Conv2d(32, 32, 3, padding=1, groups=2))
    assert not conv_supported(torch.nn.Conv2d(32, 32, 3, padding="same", groups=2))
    assert not conv_supported(torch.nn.Conv2d(32, 32, 3, padding="valid", groups=2))
    assert not conv_supported(torch.nn.Conv2d(32, 32, 3, padding=1, groups=1))  # a dense conv: cuDNN's


def test_offsets_past_32_bits_are_refused():
    # 512 numbers, but channel c at offset c * 2**27: a sliced view of a huge tensor reaches past 2**31 (its
    # storage is never read: the check looks at shape and strides only)
    wide = torch.empty(2 ** 33, device="meta").as_strided((1, 32, 4, 4), (0, 2 ** 27, 4, 1))
    with pytest.raises(ValueError, match=r"input \(1, 32, 4, 4\) too large for 32-bit indexing"):
        grouped_conv2d(wide, torch.randn(32, 16, 3, 3), None, (1, 1), (1, 1), 2)


@pytest.mark.skipif(kernels.INTERPRETED or torch.cuda.is_available(), reason="the kernels can run here")
def test_no_triton_layout_where_the_kernels_cannot_run():
    conv = torch.nn.Conv2d(32, 32, 3, padding=1, groups=2)
    assert not conv_supported(conv)  # a CPU weight without the interpreter
