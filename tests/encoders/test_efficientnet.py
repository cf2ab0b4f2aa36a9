"""EfficientNet-Lite0: TF "same" padding and the packaged ImageNet weights."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from mmrag.encoders.efficientnet import (
    IMAGE_FEATURES,
    Conv2dSame,
    EfficientNetLite0,
    fold_batch_norms,
    load_efficientnet_lite0,
    same_padding,
    traced_features,
)
from mmrag.encoders.lite import image_batch

ESPRESSO = 967  # ImageNet class index


@pytest.mark.parametrize(
    ("size", "kernel", "stride", "expected"),
    [
        (224, 3, 2, (0, 1)),  # TF pads the extra pixel after, not before
        (225, 3, 2, (1, 1)),
        (7, 5, 1, (2, 2)),
        (8, 5, 2, (1, 2)),
        (1, 3, 2, (1, 1)),
        (4, 1, 1, (0, 0)),
    ],
)
def test_same_padding_matches_tf(
    size: int, kernel: int, stride: int, expected: tuple[int, int]
) -> None:
    assert same_padding(size, kernel, stride) == expected


@pytest.mark.parametrize(("size", "stride"), [(13, 2), (14, 2), (15, 1), (128, 2)])
def test_conv_same_output_is_ceil_of_input_over_stride(size: int, stride: int) -> None:
    conv = Conv2dSame(2, 3, 5, stride=stride)
    y = conv(torch.zeros(1, 2, size, size + 1))
    assert y.shape == (1, 3, -(-size // stride), -(-(size + 1) // stride))


def test_stride2_padding_is_asymmetric_like_tf() -> None:
    # A 3x3 all-ones kernel at stride 2 on an even input: TF pads only bottom/right, so the
    # first output sums a full 3x3 window of ones (9), and the last one a 2x2 window (4).
    conv = Conv2dSame(1, 1, 3, stride=2)
    with torch.no_grad():
        conv.weight.fill_(1.0)
    y = conv(torch.ones(1, 1, 4, 4))
    assert y[0, 0].tolist() == [[9.0, 6.0], [6.0, 4.0]]


def test_features_and_logits_shapes_for_any_size() -> None:
    model = EfficientNetLite0().eval()
    with torch.inference_mode():
        x = torch.zeros(2, 3, 67, 90)
        assert model.features(x).shape == (2, IMAGE_FEATURES)
        assert model(x).shape == (2, 1000)


@pytest.fixture(scope="module")
def pretrained() -> EfficientNetLite0:
    return load_efficientnet_lite0()


@pytest.mark.pretrained
def test_strict_load_classifies_coffee_as_espresso(pretrained: EfficientNetLite0) -> None:
    data = pytest.importorskip("skimage.data")
    from PIL import Image

    x = image_batch([Image.fromarray(data.coffee())], 224)
    assert float(x.min()) >= -1.0
    assert float(x.max()) <= 1.0
    with torch.inference_mode():
        probs = pretrained(x).softmax(-1)[0]
    assert int(probs.argmax()) == ESPRESSO
    assert float(probs[ESPRESSO]) > 0.8


@pytest.mark.pretrained
def test_channels_last_gives_the_same_features(pretrained: EfficientNetLite0) -> None:
    x = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(0)) * 2 - 1
    with torch.inference_mode():
        a = pretrained.features(x).numpy()
        b = pretrained.features(x.contiguous(memory_format=torch.channels_last)).numpy()
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)


def test_folded_batch_norms_give_the_same_features_and_logits() -> None:
    torch.manual_seed(0)
    model = EfficientNetLite0().eval()
    for module in model.modules():  # batch-norm statistics far from the identity
        if isinstance(module, torch.nn.BatchNorm2d):
            module.running_mean.uniform_(-0.5, 0.5)
            module.running_var.uniform_(0.5, 2.0)
            module.weight.data.uniform_(0.5, 1.5)
            module.bias.data.uniform_(-0.2, 0.2)
    x = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(1)) * 2 - 1
    with torch.inference_mode():
        features, logits = model.features(x), model(x)
    folded = fold_batch_norms(copy.deepcopy(model))
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in folded.modules())
    with torch.inference_mode():
        np.testing.assert_allclose(folded.features(x), features, rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(folded(x), logits, rtol=1e-4, atol=1e-4)


def test_traced_features_equal_the_module_bit_for_bit() -> None:
    torch.manual_seed(0)
    model = fold_batch_norms(EfficientNetLite0().eval())
    model = model.to(memory_format=torch.channels_last)  # type: ignore[call-overload]
    traced = traced_features(model, 64, torch.device("cpu"))
    assert traced is not None
    generator = torch.Generator().manual_seed(2)
    with torch.inference_mode():
        for batch in (1, 5, 2, 1):  # any batch, and repeated calls
            x = torch.rand(batch, 3, 64, 64, generator=generator) * 2 - 1
            x = x.contiguous(memory_format=torch.channels_last)
            assert torch.equal(traced(x), model.features(x))
