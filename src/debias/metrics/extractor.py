"""torch-fidelity's ``inception-v3-compat`` forward pass, made fast: the same features up to float rounding.

:class:`FastInception` runs ``FeatureExtractorInceptionV3.forward``
(torch_fidelity/feature_extractor_inceptionv3.py) on the same modules and weights with three changes,
each measured by benchmarks/fid_profile.py on a 2-core CPU (benchmarks/BENCHMARKS.md) and together
checked against torch-fidelity's own extractor in tests/test_metrics.py (features within 1e-5 relative):

- the TensorFlow-1 bilinear resize to 299×299 (torch-fidelity's ``interpolate_compat_tensorflow``,
  ``resample_manually``: ``lo + (hi - lo)·d`` per axis) as two matrix products with the same weights,
  ``R_y · x · R_xᵀ`` where row i of ``R`` holds ``1 - d_i`` at ``lo_i`` and ``d_i`` at ``hi_i``;
- every BatchNorm folded into its convolution: ``((W ∗ x) - μ)·s + β = (W·s) ∗ x + (β - μ·s)`` with
  ``s = γ / √(σ² + ε)``, computed in float64 and rounded once;
- channels-last activations, for which oneDNN (and cuDNN) pick their fastest convolution and pooling kernels.

On CUDA the network runs in plain float32 (no TF32), as torch-fidelity's does by default for matmuls.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Iterator

import torch
from torch import Tensor, nn

INPUT_SIZE = 299  # FeatureExtractorInceptionV3.INPUT_IMAGE_SIZE
STEM = ("Conv2d_1a_3x3", "Conv2d_2a_3x3", "Conv2d_2b_3x3", "MaxPool_1", "Conv2d_3b_1x1", "Conv2d_4a_3x3", "MaxPool_2")
BLOCKS = ("Mixed_5b", "Mixed_5c", "Mixed_5d", "Mixed_6a", "Mixed_6b", "Mixed_6c", "Mixed_6d", "Mixed_6e",
          "Mixed_7a", "Mixed_7b", "Mixed_7c")
LAYERS = ("2048", "logits_unbiased")  # the torch-fidelity outputs this forward pass provides


def resize_weights(size_in: int, size_out: int = INPUT_SIZE) -> Tensor:
    """float32 (size_out, size_in): TensorFlow 1's bilinear interpolation (align_corners=False) along
    one axis, with torch-fidelity's float32 grid arithmetic."""
    grid = torch.arange(0, size_out, 1, dtype=torch.float32) * torch.tensor(size_in / size_out, dtype=torch.float32)
    lo = grid.long()
    hi = (lo + 1).clamp_max(size_in - 1)
    d = grid - lo.float()
    rows = torch.arange(size_out)
    weights = torch.zeros(size_out, size_in)
    weights.index_put_((rows, lo), 1 - d, accumulate=True)
    weights.index_put_((rows, hi), d, accumulate=True)
    return weights


def fold_batch_norm(block: nn.Module) -> None:
    """Replace a torch-fidelity ``BasicConv2d``'s conv + BN (eval mode) by one biased conv, in place."""
    conv, bn = block.conv, block.bn
    scale = bn.weight.double() / torch.sqrt(bn.running_var.double() + bn.eps)
    fused = nn.Conv2d(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding, bias=True)
    with torch.no_grad():
        fused.weight.copy_(conv.weight.double() * scale.reshape(-1, 1, 1, 1))
        fused.bias.copy_(bn.bias.double() - bn.running_mean.double() * scale)
    block.conv, block.bn = fused.requires_grad_(False), nn.Identity()


class FastInception(nn.Module):
    """``FeatureExtractorInceptionV3`` (a torch-fidelity module, left unchanged: this holds a folded
    copy) as above: uint8 (N, 3, H, W) → float32 features, one per requested layer of :data:`LAYERS`.
    The submodules keep torch-fidelity's names (``Mixed_6d.branch1x1``, …), so hooks find them."""

    def __init__(self, fidelity: nn.Module, layers: tuple[str, ...]):
        super().__init__()
        unknown = [layer for layer in layers if layer not in LAYERS]
        if unknown:
            raise ValueError(f"unknown Inception layer {unknown[0]!r}; this extractor provides {', '.join(LAYERS)}")
        self.layers = layers
        net = copy.deepcopy(fidelity).float().eval()
        for module in list(net.modules()):
            if hasattr(module, "conv") and isinstance(getattr(module, "bn", None), nn.BatchNorm2d):
                fold_batch_norm(module)
        for name in (*STEM, *BLOCKS, "fc"):
            setattr(self, name, getattr(net, name))
        self.requires_grad_(False)
        self.to(memory_format=torch.channels_last)
        self._resize: dict[tuple[int, int, torch.device], tuple[Tensor, Tensor]] = {}

    def resize(self, x: Tensor) -> Tensor:
        """float32 (N, C, H, W) → (N, C, 299, 299), TF-1 bilinear (see the module docstring)."""
        key = (x.shape[2], x.shape[3], x.device)
        if key not in self._resize:
            self._resize[key] = (resize_weights(x.shape[2]).to(x.device), resize_weights(x.shape[3]).T.to(x.device))
        rows, columns = self._resize[key]
        return torch.matmul(torch.matmul(rows, x), columns)

    def forward(self, x: Tensor) -> tuple[Tensor, ...]:
        """uint8 (N, 3, H, W) → (N, 2048) pool features and/or (N, 1008) unbiased logits, float32."""
        x = (self.resize(x.float()) - 128) / 128
        x = x.contiguous(memory_format=torch.channels_last)
        for name in (*STEM, *BLOCKS):
            x = getattr(self, name)(x)
        pool = torch.flatten(nn.functional.adaptive_avg_pool2d(x, (1, 1)), 1)
        outputs = {"2048": pool}
        if "logits_unbiased" in self.layers:
            outputs["logits_unbiased"] = pool.mm(self.fc.weight.T)
        return tuple(outputs[layer].float() for layer in self.layers)


@contextlib.contextmanager
def exact_float32(device: torch.device) -> Iterator[None]:
    """On CUDA, plain IEEE float32 convolutions and matmuls while inside (TF32, which sampling and
    training switch on, would move the features by ~1e-3); nothing to do on the CPU."""
    if device.type != "cuda":
        yield
        return
    conv, matmul = torch.backends.cudnn.conv.fp32_precision, torch.backends.cuda.matmul.fp32_precision
    torch.backends.cudnn.conv.fp32_precision = torch.backends.cuda.matmul.fp32_precision = "ieee"
    try:
        yield
    finally:
        torch.backends.cudnn.conv.fp32_precision, torch.backends.cuda.matmul.fp32_precision = conv, matmul
