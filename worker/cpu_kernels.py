"""Exact CPU kernels for HybridGNet's encoder: the same operations in the same order
as torch's, so the same bits, only faster.

- ``batch_norm``: one image's BatchNorm, about 1.5x faster than torch's kernel;
- ``max_pool2``: a 2x2 max-pool without the argmax indices, about 15x faster;
- ``add_relu_pool``: the end of a residual block a band of rows at a time.

BatchNorm:

torch's batch_norm (training statistics, which HybridGNet uses even in eval) sums
each channel in float64 one element after the other: a chain of dependent
additions, ~3 cycles each, while the core could start two per cycle. Here eight
channels' chains run side by side, each in exactly torch's order, and the output
is torch's ``fma(x, alpha, beta)``. Same operations, same order, same bits.

That is a claim about one torch build on one CPU, so ``exact_here`` checks it
once per process against torch on probes that tell the candidate orders apart;
where it fails (another torch version or instruction set), ``batch_norm``
answers None and the caller uses torch's kernel.
"""

from __future__ import annotations

import logging
import threading

import numpy as np
import torch
from llvmlite import ir
from numba import njit
from numba.extending import intrinsic

log = logging.getLogger(__name__)

# Channels summed side by side; every encoder width of HybridGNet is a multiple.
LANES = 8


@intrinsic
def _fma(typingctx, a, b, c):
    """Fused multiply-add, rounded once (LLVM's fma intrinsic)."""

    def codegen(context, builder, signature, args):
        t = args[0].type
        fn = builder.module.declare_intrinsic("llvm.fma", [t], ir.FunctionType(t, [t, t, t]))
        return builder.call(fn, args)

    return a(a, b, c), codegen


def _compiled(fn):
    """Compiled without the GIL, cached on disk where numba finds a writable place
    (else, as in a read-only container without NUMBA_CACHE_DIR, compiled at each start)."""
    try:
        return njit(nogil=True, cache=True)(fn)
    except RuntimeError:  # numba: "cannot cache function ...: no locator available"
        return njit(nogil=True)(fn)


@_compiled
def _channel_sums(x: np.ndarray, mean: np.ndarray, centred: bool, out: np.ndarray) -> None:
    """out[c] = sum over i of x[c, i] (or of (x[c, i] - mean[c])**2 in float32), added
    in float64 from i = 0 up, eight channels at a time."""
    C, n = x.shape
    for c in range(0, C, LANES):
        m0, m1, m2, m3 = mean[c], mean[c + 1], mean[c + 2], mean[c + 3]
        m4, m5, m6, m7 = mean[c + 4], mean[c + 5], mean[c + 6], mean[c + 7]
        s0 = s1 = s2 = s3 = s4 = s5 = s6 = s7 = 0.0
        if centred:
            for i in range(n):
                d0, d1, d2, d3 = x[c, i] - m0, x[c + 1, i] - m1, x[c + 2, i] - m2, x[c + 3, i] - m3
                d4, d5, d6, d7 = x[c + 4, i] - m4, x[c + 5, i] - m5, x[c + 6, i] - m6, x[c + 7, i] - m7
                s0 += d0 * d0
                s1 += d1 * d1
                s2 += d2 * d2
                s3 += d3 * d3
                s4 += d4 * d4
                s5 += d5 * d5
                s6 += d6 * d6
                s7 += d7 * d7
        else:
            for i in range(n):
                s0 += x[c, i]
                s1 += x[c + 1, i]
                s2 += x[c + 2, i]
                s3 += x[c + 3, i]
                s4 += x[c + 4, i]
                s5 += x[c + 5, i]
                s6 += x[c + 6, i]
                s7 += x[c + 7, i]
        out[c], out[c + 1], out[c + 2], out[c + 3] = s0, s1, s2, s3
        out[c + 4], out[c + 5], out[c + 6], out[c + 7] = s4, s5, s6, s7


@_compiled
def _scale_shift(x: np.ndarray, alpha: np.ndarray, mean: np.ndarray, bias: np.ndarray, out: np.ndarray) -> None:
    """out = x * alpha + (bias - mean * alpha), each with one rounding as torch's compiled kernel."""
    C, n = x.shape
    for c in range(C):
        a = alpha[c]
        b = _fma(-mean[c], a, bias[c])  # type: ignore[call-arg, var-annotated]  # numba's intrinsic adds typingctx
        for i in range(n):
            out[c, i] = _fma(x[c, i], a, b)


def _batch_norm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float) -> torch.Tensor:
    C = x.shape[1]
    flat = x.numpy().reshape(C, -1)
    n = flat.shape[1]
    sums = np.empty(C, np.float64)
    zeros = np.zeros(C, np.float32)
    _channel_sums(flat, zeros, False, sums)
    mean = (sums / n).astype(np.float32)  # float64 division, then float32: torch's save_mean
    _channel_sums(flat, mean, True, sums)
    var = sums.astype(np.float32) / np.float32(n)  # float32 division, as torch's
    invstd = (1.0 / np.sqrt(var.astype(np.float64) + eps)).astype(np.float32)
    alpha = invstd * weight.detach().numpy()
    out = np.empty_like(flat)
    _scale_shift(flat, alpha, mean, bias.detach().numpy(), out)
    return torch.from_numpy(out).view(x.shape)


def _probes() -> list[torch.Tensor]:
    """Inputs on which the candidate summation orders and roundings give different bits."""
    g = torch.Generator().manual_seed(0)
    noise = torch.randn(1, LANES, 96, 96, generator=g)
    wide = torch.randn(1, LANES, 64, 64, generator=g) * 1e-3 + 100  # order of the float64 sums
    cancel = torch.ones(1, LANES, 64, 64)  # a running float64 sum loses the ones; a pairwise one keeps them
    cancel[..., 0, 0], cancel[..., -1, -1] = 1e17, -1e17
    return [noise, wide, cancel, torch.randn(1, 4 * LANES, 16, 16, generator=g) * 5 - 3]


_lock = threading.Lock()
_exact: bool | None = None


def exact_here() -> bool:
    """Whether this kernel gives torch's bits on this machine (checked once per process)."""
    global _exact
    if _exact is not None:  # every BatchNorm asks: no lock once it is known
        return _exact
    with _lock:
        if _exact is None:
            try:
                _exact = _matches_torch()
            except Exception as exc:  # numba fails to compile in many ways; torch's kernel still works
                log.warning("the fast CPU BatchNorm does not compile here (%s); using torch's kernel", exc)
                _exact = False
            else:
                if not _exact:
                    log.warning("the fast CPU BatchNorm does not match torch here; using torch's kernel")
        return _exact


def _matches_torch() -> bool:
    g = torch.Generator().manual_seed(1)
    with torch.inference_mode():
        for x in _probes():
            weight = torch.rand(x.shape[1], generator=g) + 0.5
            bias = torch.randn(x.shape[1], generator=g)
            expected = torch.batch_norm(x, weight, bias, None, None, True, 0.0, 1e-5, False)
            if not torch.equal(_batch_norm(x, weight, bias, 1e-5), expected):
                return False
    return True


def batch_norm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float) -> torch.Tensor | None:
    """``batch_norm`` of a single image with its own statistics, or None where this kernel
    does not apply (autograd, GPU, not float32, channels not a multiple of eight, another
    memory layout, whose torch kernel sums in another order, several torch threads, which
    torch's kernel uses and this one does not) or is not exact here."""
    if (
        x.shape[0] != 1
        or x.shape[1] % LANES
        or x.dtype != torch.float32
        or x.device.type != "cpu"
        or not x.is_contiguous()
        or torch.is_grad_enabled()
        or torch.get_num_threads() != 1
        or not exact_here()
    ):
        return None
    return _batch_norm(x, weight, bias, eps)


# ---------------------------------------------------------------------------
# Pooling


def max_pool2(x: torch.Tensor) -> torch.Tensor:
    """``F.max_pool2d(x, 2)`` for even sizes, bit for bit, about 15x faster on the CPU:
    the pooling kernel also computes argmax indices, which nothing here needs. Pairs
    of rows first (long contiguous runs), then pairs of columns of half as much data."""
    B, C, H, W = x.shape
    rows = x.reshape(B, C, H // 2, 2, W)
    rows = torch.maximum(rows[:, :, :, 0], rows[:, :, :, 1]).view(B, C, H // 2, W // 2, 2)
    return torch.maximum(rows[..., 0], rows[..., 1])


# Elements of one band of ``add_relu_pool`` (512 KiB of float32: stays in a core's L2 cache).
BAND_ELEMENTS = 1 << 17


def add_relu_pool(block: torch.Tensor, shortcut: torch.Tensor) -> torch.Tensor:
    """``max_pool2(relu(block + shortcut))`` band by band of rows. Over whole maps the three
    steps each stream the 32 MiB maps of the first level through memory, and memory
    bandwidth is what two images segmented side by side compete for. Every output element
    comes from the same element-wise operations, so the result is identical."""
    B, C, H, W = block.shape
    rows = max(2, BAND_ELEMENTS // (C * W) // 2 * 2)
    out = block.new_empty(B, C, H // 2, W // 2)
    for top in range(0, H, rows):
        band = block[:, :, top : top + rows] + shortcut[:, :, top : top + rows]
        out[:, :, top // 2 : (top + rows) // 2] = max_pool2(band.relu_())
    return out
