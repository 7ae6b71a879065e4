"""The fast CPU kernels give torch's bits: cpu_norm's BatchNorm, and the whole model."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from chexmask.worker import cpu_kernels
from chexmask.worker.cpu_kernels import add_relu_pool
from chexmask.worker.decode import decode_path
from chexmask.worker.model import HybridGNet, HybridGNetConfig, segment_batch
from chexmask.worker.preprocess import preprocess

# The encoder's map shapes (channels, side) where the kernel applies.
SHAPES = [(8, 1024), (16, 512), (32, 256), (64, 128), (128, 64), (128, 32)]


@pytest.fixture
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _affine(channels: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(channels, generator=g) + 0.5, torch.randn(channels, generator=g)


@pytest.mark.parametrize("channels,side", SHAPES)
def test_kernel_gives_torch_bits_or_is_not_used(channels, side, one_thread):
    """On this machine the kernel must match torch exactly; where a torch build differs,
    the per-process check must have switched it off (batch_norm answers None)."""
    g = torch.Generator().manual_seed(channels)
    x = torch.randn(1, channels, side, side, generator=g) * 3 + 0.5
    weight, bias = _affine(channels, side)
    expected = torch.batch_norm(x, weight, bias, None, None, True, 0.0, 1e-5, False)
    ours = cpu_kernels._batch_norm(x, weight, bias, 1e-5)
    with torch.inference_mode():
        used = cpu_kernels.batch_norm(x, weight, bias, 1e-5)
    if torch.equal(ours, expected):
        assert used is not None and torch.equal(used, expected)
    else:
        assert used is None and not cpu_kernels.exact_here()


def test_kernel_is_exact_on_this_kind_of_machine():
    """CI runs on x86-64 with torch's AVX2 kernels, where the kernel must be in use."""
    assert cpu_kernels.exact_here(), "cpu_norm no longer reproduces torch's batch_norm here"


def test_probes_tell_a_pairwise_sum_and_an_unfused_multiply_add_apart(monkeypatch):
    """The check would catch a kernel that sums in another order or rounds twice."""

    def pairwise(x, weight, bias, eps):
        mean = x.double().mean((0, 2, 3)).float()
        var = ((x - mean[:, None, None]) ** 2).double().mean((0, 2, 3)).float()
        invstd = (1 / torch.sqrt(var.double() + eps)).float()
        alpha = invstd * weight
        return x * alpha[:, None, None] + (bias - mean * alpha)[:, None, None]

    def unfused(x, weight, bias, eps):  # torch's statistics, two roundings in the output
        _, mean, invstd = torch.native_batch_norm(x, weight, bias, None, None, True, 0.0, eps)
        alpha = invstd * weight
        return x * alpha[:, None, None] + (bias - mean * alpha)[:, None, None]

    for wrong in (pairwise, unfused):
        monkeypatch.setattr(cpu_kernels, "_batch_norm", wrong)
        assert not cpu_kernels._matches_torch(), wrong.__name__


def test_no_kernel_where_it_does_not_apply():
    x = torch.randn(1, 8, 16, 16)
    weight, bias = _affine(8, 0)
    assert cpu_kernels.batch_norm(x, weight, bias, 1e-5) is None  # autograd on
    with torch.inference_mode():
        assert cpu_kernels.batch_norm(torch.randn(2, 8, 16, 16), weight, bias, 1e-5) is None  # a batch
        assert cpu_kernels.batch_norm(torch.randn(1, 4, 16, 16), weight[:4], bias[:4], 1e-5) is None
        assert cpu_kernels.batch_norm(x.double(), weight.double(), bias.double(), 1e-5) is None
        channels_last = x.contiguous(memory_format=torch.channels_last)
        assert cpu_kernels.batch_norm(channels_last, weight, bias, 1e-5) is None


def test_add_relu_pool_is_the_three_operations():
    g = torch.Generator().manual_seed(3)
    block, shortcut = torch.randn(1, 8, 96, 64, generator=g), torch.randn(1, 8, 96, 64, generator=g)
    expected = torch.nn.functional.max_pool2d(torch.relu(block + shortcut), 2)
    assert torch.equal(add_relu_pool(block, shortcut), expected)


@pytest.mark.parametrize("threads", [1, 2])
def test_fast_model_equals_torch_operations_on_real_images(samples_dir: Path, threads: int):
    """Untrained weights (the most sensitive to last bits), real images of several formats:
    landmarks and latents of the fast kernels are torch's own, bit for bit."""
    torch.manual_seed(0)
    fast = HybridGNet().eval()
    plain = HybridGNet(HybridGNetConfig(fast_kernels=False)).eval()
    plain.load_state_dict(fast.state_dict())
    names = ("00000001_000.png", "16747_3_1.jpg", "siim_cr_jpeg_baseline_mono2.dcm")
    images = np.stack([preprocess(decode_path(samples_dir / n)).image for n in names])
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(threads)
        ours, reference = segment_batch(fast, images), segment_batch(plain, images)
    finally:
        torch.set_num_threads(before)
    np.testing.assert_array_equal(ours[0], reference[0])
    np.testing.assert_array_equal(ours[1], reference[1])


def test_a_kernel_that_does_not_compile_leaves_torch_in_charge(monkeypatch, caplog, one_thread):
    def broken() -> bool:
        raise RuntimeError("no LLVM here")

    monkeypatch.setattr(cpu_kernels, "_exact", None)  # a fresh process
    monkeypatch.setattr(cpu_kernels, "_matches_torch", broken)
    weight, bias = _affine(8, 0)
    with torch.inference_mode():
        assert cpu_kernels.batch_norm(torch.randn(1, 8, 16, 16), weight, bias, 1e-5) is None
    assert "does not compile here (no LLVM here)" in caplog.text
