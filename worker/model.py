"""HybridGNet (HybridGNet2IGSC): a CNN encoder and a graph decoder that outputs
120 lung and heart landmarks on a 1024x1024 chest X-ray.

Follows the official model of Gaggion et al. (CheXmask, Scientific Data 2024;
ngaggion/CheXmask-Database, HybridGNet/models/HybridGNet2IGSC.py at 8ae0c33)
as specified in ../shared/reference/SPEC.md. It loads the official
``state_dict`` unchanged (same keys, same shapes) and reproduces its forward
pass, with two deliberate differences:

* Batch invariance. The official encoder uses BatchNorm without running
  statistics, so even in eval mode an image is normalised with the statistics
  of its batch-mates and its landmarks change with them (up to 836 px). In
  eval we normalise each image with its own statistics, which is exactly the
  official batch-of-1 computation, for every image of a batch.
  ``HybridGNetConfig(batch_invariant=False)`` restores the official behaviour.
* Current torch-geometric. The official ChebConv subclass breaks on PyG >= 2.5;
  we use PyG's own ChebConv (identical keys and arithmetic) and replace
  torchvision's ``roi_align`` by ``roi_lookup`` below, which reproduces it
  bit for bit and lets tests inject the official sample counts.

For speed on the CPU, pooling, the end of each residual block and the
single-image BatchNorm run through kernels that compute the same operations in
the same order (``cpu_kernels``); the results
are bit for bit those of torch's own operations, which
``HybridGNetConfig(fast_kernels=False)`` uses instead.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch_geometric.nn import ChebConv

from chexmask.anatomy import FRAME, ORGAN_SIZES
from chexmask.errors import ConfigError, WeightsError
from chexmask.worker import cpu_kernels
from chexmask.worker.cpu_kernels import add_relu_pool, max_pool2


@dataclass(frozen=True)
class HybridGNetConfig:
    latents: int = 64
    input_size: int = FRAME
    encoder_channels: tuple[int, ...] = (8, 16, 32, 64, 128)
    filters: tuple[int, ...] = (2, 32, 32, 32, 16, 16, 16)  # decoder widths, fine to coarse
    K: int = 6  # Chebyshev order
    batch_invariant: bool = True
    # Faster CPU kernels with torch's bits (cpu_kernels). False runs
    # the official operations only: the benchmark's naive loop and the tests' reference.
    fast_kernels: bool = True


# ---------------------------------------------------------------------------
# Graphs


def organ_graphs(sizes: tuple[int, ...] = tuple(ORGAN_SIZES.values())):
    """Adjacency of the fine graph, of the coarse graph and the unpooling matrix U.

    Each organ is a closed cycle. The coarse level keeps ceil(N/2) nodes per organ;
    an even fine node copies its coarse node, an odd one averages two (SPEC 5).
    """
    coarse_sizes = [math.ceil(n / 2) for n in sizes]
    A = np.zeros((sum(sizes),) * 2, np.float32)
    AD = np.zeros((sum(coarse_sizes),) * 2, np.float32)
    U = np.zeros((sum(sizes), sum(coarse_sizes)), np.float32)
    fine0 = coarse0 = 0
    for n, m in zip(sizes, coarse_sizes, strict=True):
        for i in range(n):
            A[fine0 + i, fine0 + (i + 1) % n] = A[fine0 + (i + 1) % n, fine0 + i] = 1
        for j in range(m):
            AD[coarse0 + j, coarse0 + (j + 1) % m] = AD[coarse0 + (j + 1) % m, coarse0 + j] = 1
        for i in range(n):
            if i % 2 == 0:
                U[fine0 + i, coarse0 + i // 2] = 1
            else:
                U[fine0 + i, coarse0 + i // 2] = 0.5
                U[fine0 + i, coarse0 + (i // 2 + 1) % m] = 0.5
        fine0 += n
        coarse0 += m
    return A, AD, U


def edge_index(adjacency: np.ndarray) -> torch.Tensor:
    """Edges in the order the official code feeds PyG (scipy CSC -> COO: by column,
    then row). The order fixes PyG's summation order, hence the last bits."""
    cols, rows = np.nonzero(adjacency.T)
    return torch.from_numpy(np.stack([rows, cols]).astype(np.int64))


# ---------------------------------------------------------------------------
# Encoder


class ImageNorm2d(nn.BatchNorm2d):
    """BatchNorm2d without running statistics (the official layer, same keys).

    Training normalises over the batch, as the official model did. In eval a
    batch-invariant model normalises each image by itself: ``instance_norm``
    with the BatchNorm affine is the batch-of-1 BatchNorm, image by image.
    """

    def __init__(self, channels: int, cfg: HybridGNetConfig):
        super().__init__(channels, track_running_stats=False)
        self.batch_invariant, self.fast_kernels = cfg.batch_invariant, cfg.fast_kernels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # A single image is its own batch: the official computation, and no copies.
        if self.training or not self.batch_invariant or x.shape[0] == 1:
            fast = None
            if self.fast_kernels and not self.training:
                fast = cpu_kernels.batch_norm(x, self.weight, self.bias, self.eps)
            return super().forward(x) if fast is None else fast
        return F.instance_norm(x, weight=self.weight, bias=self.bias, eps=self.eps)


class ResidualBlock(nn.Module):
    def __init__(self, cin: int, cout: int, cfg: HybridGNetConfig):
        super().__init__()
        self.fast_kernels = cfg.fast_kernels
        norm = lambda c: ImageNorm2d(c, cfg)  # noqa: E731
        # Names and order (skip before block) follow the official state_dict.
        self.skip = nn.Sequential(nn.Conv2d(cin, cout, 1, bias=False), norm(cout)) if cin != cout else None
        self.block = nn.Sequential(
            norm(cin),
            nn.ReLU(inplace=True),
            nn.Conv2d(cin, cout, 3, padding=1),
            norm(cout),
            nn.ReLU(inplace=True),
            nn.Conv2d(cout, cout, 3, padding=1),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = x if self.skip is None else self.skip(x)
        return F.relu_(self.block(x) + shortcut)

    def forward_pooled(self, x: torch.Tensor) -> torch.Tensor:
        """``F.max_pool2d(self(x), 2)``. With fast kernels and no autograd the sum, ReLU and
        pooling run a band of rows at a time (``add_relu_pool``): the same operations on
        the same numbers."""
        if not self.fast_kernels:
            return F.max_pool2d(self(x), 2)
        if torch.is_grad_enabled():
            return max_pool2(self(x))
        shortcut = x if self.skip is None else self.skip(x)
        return add_relu_pool(self.block(x), shortcut)


class Encoder(nn.Module):
    dconv_down5: ResidualBlock  # registered by name in __init__, as the official keys are
    dconv_down6: ResidualBlock

    def __init__(self, cfg: HybridGNetConfig):
        super().__init__()
        self.fast_kernels = cfg.fast_kernels
        c = (1, *cfg.encoder_channels, cfg.encoder_channels[-1])
        for i in range(6):
            self.add_module(f"dconv_down{i + 1}", ResidualBlock(c[i], c[i + 1], cfg))
        side = cfg.input_size // 2**5
        self.fc_mu = nn.Linear(c[-1] * side * side, cfg.latents)
        self.fc_logvar = nn.Linear(c[-1] * side * side, cfg.latents)

    def forward(self, x: torch.Tensor):
        for i in range(1, 5):
            x = getattr(self, f"dconv_down{i}").forward_pooled(x)
        conv5 = self.dconv_down5(x)
        conv6 = self.dconv_down6(max_pool2(conv5) if self.fast_kernels else F.max_pool2d(conv5, 2))
        flat = conv6.flatten(1)
        if self.training:
            return self.fc_mu(flat), self.fc_logvar(flat), conv5, conv6
        # logvar only matters for the training objective; eval skips the 8M-weight layer.
        return self._mu_exact(flat), None, conv5, conv6

    def _mu_exact(self, flat: torch.Tensor) -> torch.Tensor:
        """fc_mu summed in float64. Its 131,072-term float32 sums are split across threads,
        so mu (and, through the skip lookups' sample counts, landmarks) would depend on the
        core count; in float64 the rounding to float32 hides the order of the sum."""
        w = self.fc_mu.weight
        key = (w.data_ptr(), w._version, w.device)
        if getattr(self, "_mu_weight64", (None,))[0] != key:
            self._mu_weight64 = (key, w.detach().double())
        return F.linear(flat.double(), self._mu_weight64[1], self.fc_mu.bias.double()).to(flat.dtype)


# ---------------------------------------------------------------------------
# Skip connections: image features sampled at the predicted positions


def roi_sample_counts(pos: torch.Tensor, size: int) -> torch.Tensor:
    """Samples per axis of torchvision's roi_align for the official 3x3 box:
    nominally 3, but 4 when float32 rounding makes the box 3 + 1 ulp wide (SPEC 3)."""
    p = pos.detach().float() * size
    width = ((p + 2) - 0.5) - ((p - 1) - 0.5)
    return torch.ceil(width).to(torch.int64)


def roi_lookup(pos: torch.Tensor, fmap: torch.Tensor, counts: torch.Tensor | None = None) -> torch.Tensor:
    """torchvision ``roi_align(output 1x1, aligned=True, sampling_ratio=-1)`` over the
    box [p*S - 1, p*S + 2] for each node, reproduced operation by operation.

    pos [B,N,2] in [0,1] image units (x, y); fmap [B,C,S,S]; counts [B,N,2] optional
    per-axis sample counts (a test hook for the official ones). Returns [B,N,C].
    Like roi_align it passes gradients to ``fmap`` only.
    """
    B, N, _ = pos.shape
    C, S = fmap.shape[1], fmap.shape[-1]
    p = pos.detach().float() * S
    start = (p - 1) - 0.5
    width = ((p + 2) - 0.5) - start
    counts = roi_sample_counts(pos, S) if counts is None else counts.to(torch.int64)
    flat = fmap.flatten(2).transpose(1, 2)  # [B, S*S, C]
    batch = torch.arange(B, device=pos.device)[:, None]
    total = torch.zeros(B, N, C, dtype=fmap.dtype, device=fmap.device)
    n_max = int(counts.max())
    for iy in range(n_max):
        for ix in range(n_max):
            i = torch.tensor([ix + 0.5, iy + 0.5], device=pos.device)
            coord = start + (i * width) / counts  # [B,N,2]: x, y
            value = _bilinear(flat, batch, coord, S)
            valid = (ix < counts[..., 0]) & (iy < counts[..., 1])
            total = total + torch.where(valid[..., None], value, torch.zeros_like(value))
    return total / (counts[..., 0] * counts[..., 1])[..., None].to(fmap.dtype)


def _bilinear(flat: torch.Tensor, batch: torch.Tensor, coord: torch.Tensor, S: int) -> torch.Tensor:
    """One bilinear sample with torchvision's border rules."""
    index, weights, outside = _bilinear_taps(coord, S)
    v = lambda k: flat[batch, index[..., k]]  # noqa: E731
    w1, w2, w3, w4 = (w[..., None] for w in weights)
    value = w1 * v(0) + w2 * v(1) + w3 * v(2) + w4 * v(3)
    return torch.where(outside[..., None], torch.zeros_like(value), value)


def _bilinear_taps(coord: torch.Tensor, S: int) -> tuple[torch.Tensor, tuple[torch.Tensor, ...], torch.Tensor]:
    """The four pixels (flat indices [...,4]) and weights of a bilinear sample at ``coord``
    [...,2] (x, y) on an S x S map, with torchvision's border rules, and where it falls
    outside the map (value 0)."""
    outside = ((coord < -1) | (coord > S)).any(-1)
    c = coord.clamp(min=0)
    low = c.floor().to(torch.int64)
    at_edge = low >= S - 1
    low = torch.where(at_edge, torch.full_like(low, S - 1), low)
    high = torch.where(at_edge, low, low + 1)
    c = torch.where(at_edge, low.to(c.dtype), c)
    frac = c - low
    rest = 1 - frac
    (lx, ly), (hx, hy) = frac.unbind(-1), rest.unbind(-1)
    (x0, y0), (x1, y1) = low.unbind(-1), high.unbind(-1)
    index = torch.stack([y0 * S + x0, y0 * S + x1, y1 * S + x0, y1 * S + x1], -1)
    return index, (hy * hx, hy * lx, ly * hx, ly * lx), outside


def roi_lookup_shared(pos: torch.Tensor, fmap: torch.Tensor) -> torch.Tensor:
    """``roi_lookup`` of many position sets on one image's map (``fmap`` [1,C,S,S]): the
    same samples and weights, summed by one ``embedding_bag`` instead of a gather per
    sample point, which makes decoding the latent samples of the uncertainty cheap.
    Equal to ``roi_lookup`` up to float rounding (another summation order)."""
    B, N, _ = pos.shape
    C, S = fmap.shape[1], fmap.shape[-1]
    p = pos.detach().float() * S
    start = (p - 1) - 0.5
    width = ((p + 2) - 0.5) - start
    counts = roi_sample_counts(pos, S)
    n_max = int(counts.max())
    indices, weights = [], []
    for iy in range(n_max):
        for ix in range(n_max):
            i = torch.tensor([ix + 0.5, iy + 0.5], device=pos.device)
            index, taps, outside = _bilinear_taps(start + (i * width) / counts, S)
            valid = (ix < counts[..., 0]) & (iy < counts[..., 1]) & ~outside
            indices.append(index)
            weights.append(torch.stack(taps, -1) * valid[..., None])
    area = (counts[..., 0] * counts[..., 1]).to(fmap.dtype)[..., None]
    index = torch.cat(indices, -1).reshape(B * N, -1)
    weight = (torch.cat(weights, -1).to(fmap.dtype) / area).reshape(B * N, -1)
    # [S*S, C], contiguous: on a transposed view embedding_bag takes a path ~30x slower
    table = fmap[0].flatten(1).t().contiguous()
    return F.embedding_bag(index, table, per_sample_weights=weight, mode="sum").reshape(B, N, C)


class SkipLookup(nn.Module):
    """Predict a position per node, sample the feature map there, and append both."""

    def __init__(self, features: int):
        super().__init__()
        self.graphConv_pre = ChebConv(features, 2, K=1, bias=False)

    def forward(self, x, edges, fmap, counts=None):
        pos = self.graphConv_pre(x, edges)
        if fmap.shape[0] == 1 and pos.shape[0] > 1 and counts is None:
            skip = roi_lookup_shared(pos, fmap)  # latent samples of one image
        else:
            skip = roi_lookup(pos, fmap, counts)
        return torch.cat([x, skip, pos], dim=2), pos


# ---------------------------------------------------------------------------
# The network


def _node_norm(x: torch.Tensor) -> torch.Tensor:
    """The official InstanceNorm1d on [B, nodes, features]: PyTorch takes the nodes as
    channels, so each node's features are normalised by themselves (a layer norm)."""
    return F.instance_norm(x)


class HybridGNet(nn.Module):
    unpool: torch.Tensor  # a buffer

    def __init__(self, cfg: HybridGNetConfig = HybridGNetConfig()):
        super().__init__()
        self.cfg = cfg
        # Whether encoder.fc_logvar holds trained weights: compact files may leave it out,
        # and then there is no latent distribution to sample (load_model sets it).
        self.has_logvar = True
        f, K = cfg.filters, cfg.K
        skip_channels = cfg.encoder_channels[-1]
        self.encoder = Encoder(cfg)
        A, AD, U = organ_graphs()
        self.register_buffer("edges_fine", edge_index(A), persistent=False)
        self.register_buffer("edges_coarse", edge_index(AD), persistent=False)
        self.register_buffer("unpool", torch.from_numpy(U), persistent=False)
        self.coarse_nodes = AD.shape[0]
        self.dec_lin = nn.Linear(cfg.latents, f[6] * self.coarse_nodes)
        self.graphConv_up6 = ChebConv(f[6], f[5], K)
        self.graphConv_up5 = ChebConv(f[5], f[4], K)
        self.SC_1 = SkipLookup(f[4])
        self.graphConv_up4 = ChebConv(f[4] + skip_channels + 2, f[3], K)
        self.graphConv_up3 = ChebConv(f[3], f[2], K)
        self.SC_2 = SkipLookup(f[2])
        self.graphConv_up2 = ChebConv(f[2] + skip_channels + 2, f[1], K)
        self.graphConv_up1 = ChebConv(f[1], f[0], K=1, bias=False)

    def decode(self, z, conv5, conv6, counts1=None, counts2=None):
        """Latent and encoder maps -> (landmarks [B,120,2], pos1 [B,60,2], pos2 [B,120,2])."""
        act = lambda conv, x, edges: F.relu(_node_norm(conv(x, edges)))  # noqa: E731
        x = F.relu(self.dec_lin(z)).reshape(z.shape[0], self.coarse_nodes, -1)
        x = act(self.graphConv_up6, x, self.edges_coarse)
        x = act(self.graphConv_up5, x, self.edges_coarse)
        x, pos1 = self.SC_1(x, self.edges_coarse, conv6, counts1)
        x = act(self.graphConv_up4, x, self.edges_coarse)
        x = torch.matmul(self.unpool, x)
        x = act(self.graphConv_up3, x, self.edges_fine)
        x, pos2 = self.SC_2(x, self.edges_fine, conv5, counts2)
        x = act(self.graphConv_up2, x, self.edges_fine)
        return self.graphConv_up1(x, self.edges_fine), pos1, pos2

    def forward(self, x: torch.Tensor, counts1=None, counts2=None):
        """x [B,1,1024,1024] float in [0,1]. Returns (landmarks, pos1, pos2, mu, logvar).

        In training z is sampled from the variational posterior; in eval z = mu."""
        mu, logvar, conv5, conv6 = self.encoder(x)
        z = mu
        if self.training:
            z = mu + torch.randn_like(mu) * torch.exp(0.5 * logvar)
        landmarks, pos1, pos2 = self.decode(z, conv5, conv6, counts1, counts2)
        return landmarks, pos1, pos2, mu, logvar


def to_input(images: np.ndarray | torch.Tensor) -> torch.Tensor:
    """uint8 [B,1024,1024] -> float32 [B,1,1024,1024]: v/255 in float64 then float32,
    as the official script (equal to float32(v)/255 for all 256 values)."""
    t = torch.as_tensor(np.asarray(images))
    return (t.to(torch.float64) / 255.0).to(torch.float32).unsqueeze(1)


@torch.inference_mode()
def segment_batch(model: HybridGNet, images: np.ndarray, together: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Landmarks ([B,120,2], [0,1] units of the 1024 frame) and latents ([B,64]) for a
    batch of preprocessed uint8 images [B,1024,1024].

    By default each image goes through the network on its own. Per-image normalisation
    alone is not enough for exact invariance: convolution and matmul kernels pick
    different algorithms for different batch shapes, and the skip lookups' 3-or-4
    sample counts (SPEC 3) turn those last-bit differences into jumps of pixels.
    Image by image, a batch gives exactly the batch-of-1 result.

    ``together`` runs the batch in one forward pass (each image still normalised by
    its own statistics, ``ImageNorm2d``): what keeps a GPU busy. Its results equal the
    image-by-image ones up to float rounding, not bit for bit (on the CPU here: latents
    equal, landmarks within 0.6 px); ``benchmarks/bench_gpu.py`` measures it on a device."""
    device = next(model.parameters()).device
    if together:
        lm, _, _, mu, _ = model(to_input(images).to(device))
        return lm.float().cpu().numpy(), mu.float().cpu().numpy()
    landmarks, latents = [], []
    for image in images:
        lm, _, _, mu, _ = model(to_input(image[None]).to(device))
        landmarks.append(lm[0].float().cpu().numpy())
        latents.append(mu[0].float().cpu().numpy())
    return np.stack(landmarks), np.stack(latents)


@torch.inference_mode()
def segment_with_uncertainty(
    model: HybridGNet, images: np.ndarray, samples: int, seed: int = 0
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``segment_batch`` (image by image) plus each landmark's spread under the model's
    latent distribution: ``samples`` latents z = mu + eps * exp(logvar / 2) per image,
    decoded as one batch through the graph decoder only (the encoder runs once). Returns
    landmarks [B,120,2] and latents [B,64] as ``segment_batch`` does, and std [B,120]: the
    root mean squared distance of the sampled landmarks to their mean, in pixels of the
    1024 frame. The same ``seed`` draws the same eps for every image (batch-invariant)."""
    check_uncertainty(model, samples)
    device = next(model.parameters()).device
    landmarks, latents, stds = [], [], []
    for image in images:
        mu, _, conv5, conv6 = model.encoder(to_input(image[None]).to(device))
        logvar = model.encoder.fc_logvar(conv6.flatten(1))
        landmarks.append(model.decode(mu, conv5, conv6)[0][0].float().cpu().numpy())
        latents.append(mu[0].float().cpu().numpy())
        sampled = decode_samples(model, mu[0], logvar[0], conv5, conv6, samples, seed)
        stds.append(landmark_spread(sampled.float().cpu().numpy() * FRAME))
    return np.stack(landmarks), np.stack(latents), np.stack(stds)


def check_uncertainty(model: HybridGNet, samples: int) -> None:
    """Stop with one sentence when ``samples`` latent samples cannot be drawn: weights
    without a trained fc_logvar have no latent distribution (its zeros would give
    std 1 noise, not an uncertainty)."""
    if not model.has_logvar:
        raise WeightsError(
            "these weights have no encoder.fc_logvar (compact files leave it out), so there is no "
            "latent distribution to sample: uncertainty needs weights that keep it (the official "
            "checkpoint, the bundled default with its fitted .logvar.pt, or a file fitted with "
            "scripts/fit_logvar.py placed beside the weights)"
        )
    if samples < 2:
        raise ConfigError(f"uncertainty needs at least 2 latent samples, got {samples}")


def decode_samples(
    model: HybridGNet,
    mu: torch.Tensor,
    logvar: torch.Tensor,
    conv5: torch.Tensor,
    conv6: torch.Tensor,
    samples: int,
    seed: int = 0,
) -> torch.Tensor:
    """Landmarks [samples,120,2] ([0,1] units) of latents drawn from N(mu, exp(logvar))
    for one image (mu, logvar [64]; its encoder maps, batch of 1, shared by all)."""
    eps = torch.randn((samples, mu.shape[-1]), generator=torch.Generator().manual_seed(seed))
    z = mu[None] + eps.to(mu.device, mu.dtype) * torch.exp(0.5 * logvar)[None]
    return model.decode(z, conv5, conv6)[0]


def landmark_spread(sampled: np.ndarray) -> np.ndarray:
    """[N,120,2] -> [120]: root mean squared distance of each landmark's samples to their mean."""
    sampled = sampled.astype(np.float64)  # identical samples: a mean that equals them, std 0
    return np.sqrt(((sampled - sampled.mean(0)) ** 2).sum(-1).mean(0)).astype(np.float32)
