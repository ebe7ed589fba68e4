"""The architectures of the original projects, and EfficientNet-Lite0, registered by name."""

from __future__ import annotations

import copy

import torch
from torch import nn

from models import efficientnet_lite
from models.augment import TrainPreset
from models.imagenet import ImageNetSubset, dog_breeds
from models.registry import register_model
from models.weights import torchvision_model


def freeze(*modules: nn.Module) -> None:
    """Stop training these modules' parameters.

    BatchNorm running statistics still update in train mode, as in the
    original projects (only requires_grad was switched off there).
    """
    for m in modules:
        for p in m.parameters():
            p.requires_grad_(False)


def freeze_features(features: nn.Sequential, unfreeze_blocks: int) -> None:
    """Freeze all feature blocks but the last ``unfreeze_blocks`` (staged fine-tuning)."""
    n = len(features)
    if not 0 <= unfreeze_blocks <= n:
        raise ValueError(f"unfreeze_blocks must be in 0..{n}, got {unfreeze_blocks}")
    freeze(*features[: n - unfreeze_blocks])


class WithImageNetHead(nn.Module):
    """A fine-tuned ResNet that also answers ImageNet's 1000 classes: forward returns
    (class logits, ImageNet logits).

    The ImageNet branch is a frozen copy of the pretrained stages that fine-tuning
    trains (layer4, and layer3 when unfrozen) and of the pretrained classifier, fed
    from the last frozen stage: it computes exactly what the pretrained model did,
    at the cost of one more pass through the copied stages (about a fifth of
    ResNet50's work for layer4). The dog-breed handler uses it as the dog detector.
    """

    def __init__(self, model: nn.Module, imagenet_stages: nn.Sequential, imagenet_fc: nn.Module):
        super().__init__()
        self.model = model
        self.imagenet_stages = imagenet_stages
        self.imagenet_fc = imagenet_fc
        self.shared = 4 - len(imagenet_stages)  # stages before the branch: 3 (or 2)
        freeze(self.imagenet_stages, self.imagenet_fc)

    def forward(self, x):
        m = self.model
        x = m.layer2(m.layer1(m.maxpool(m.relu(m.bn1(m.conv1(x))))))
        # Written out rather than looped: TorchScript cannot index a list of unlike modules.
        if self.shared == 3:
            shared = m.layer3(x)
            x = m.layer4(shared)
        else:
            shared = x
            x = m.layer4(m.layer3(x))
        logits = m.fc(torch.flatten(m.avgpool(x), 1))
        y = self.imagenet_stages(shared)
        imagenet = self.imagenet_fc(torch.flatten(m.avgpool(y), 1))
        return logits, imagenet


# oneDNN Graph runs ResNet50 about as fast per image at batch 1 as at 8: one compiled
# copy instead of four, hundreds of MB less per worker.
@register_model("resnet50", train_preset=TrainPreset(rotation=10.0), head="fc", onednn_batches=(1,))
def resnet50(
    num_classes: int,
    weights: str | None = None,
    weights_file: str | None = None,
    unfreeze_layer3: bool = False,
    dropout: float = 0.5,
    imagenet_head: bool = False,
) -> nn.Module:
    """ResNet50 transfer model (dog breeds): conv1..layer3 frozen, layer4 and head trained.

    unfreeze_layer3 trains layer3 too (the original project's second stage).
    imagenet_head keeps the pretrained ImageNet classifier as a second output
    (WithImageNetHead); it only means something with ImageNet weights.
    """
    m = torchvision_model("resnet50", weights, weights_file)
    trained_stages = ([m.layer3] if unfreeze_layer3 else []) + [m.layer4]
    branch = (nn.Sequential(*copy.deepcopy(trained_stages)), copy.deepcopy(m.fc)) if imagenet_head else None
    frozen = [m.conv1, m.bn1, m.layer1, m.layer2] + ([] if unfreeze_layer3 else [m.layer3])
    freeze(*frozen)
    m.fc = nn.Sequential(
        nn.Linear(m.fc.in_features, 512),
        nn.ReLU(inplace=True),
        nn.Dropout(dropout),
        nn.Linear(512, num_classes),
    )
    return WithImageNetHead(m, *branch) if branch else m


@register_model("mobilenet_v2", train_preset=TrainPreset(rotation=15.0, color_jitter=0.2))
def mobilenet_v2(
    num_classes: int,
    weights: str | None = None,
    weights_file: str | None = None,
    unfreeze_blocks: int = 0,
    dropout: float = 0.2,
) -> nn.Module:
    """MobileNetV2 transfer model (flying objects): features frozen, head 1280->256->N.

    unfreeze_blocks trains the last N of the 19 feature blocks too.
    """
    m = torchvision_model("mobilenet_v2", weights, weights_file)
    freeze_features(m.features, unfreeze_blocks)
    m.classifier = nn.Sequential(
        nn.Linear(m.last_channel, 256),
        nn.ReLU(inplace=True),
        nn.Dropout(dropout),
        nn.Linear(256, num_classes),
    )
    return m


@register_model("efficientnet_lite0", eval_preset=efficientnet_lite.EVAL_PRESET)
def efficientnet_lite0(
    num_classes: int,
    weights: str | None = None,
    weights_file: str | None = None,
    unfreeze_blocks: int = 0,
    dropout: float = 0.2,
) -> nn.Module:
    """EfficientNet-Lite0 transfer model: features frozen, head Dropout + Linear 1280->N.

    Its ImageNet weights are installed with a package, so weights="DEFAULT" works
    offline (models/efficientnet_lite.py). With 1000 classes the pretrained
    classifier stays. unfreeze_blocks trains the last N of the 18 feature blocks too.
    """
    m = efficientnet_lite.efficientnet_lite0(num_classes, weights, weights_file, dropout)
    freeze_features(m.features, unfreeze_blocks)
    return m


@register_model("imagenet_dogs", eval_preset=efficientnet_lite.EVAL_PRESET)
def imagenet_dogs(
    num_classes: int = 118,
    weights: str | None = "DEFAULT",
    weights_file: str | None = None,
    unfreeze_blocks: int = 0,
) -> nn.Module:
    """EfficientNet-Lite0's ImageNet classifier answering ImageNet's 118 dog breeds, with
    all 1000 classes as its second output (the dog detector): a dog-breed model that
    needs no training (training/export/pretrained.py writes its checkpoint)."""
    breeds = len(dog_breeds())
    if num_classes != breeds:
        raise ValueError(
            f"imagenet_dogs answers ImageNet's {breeds} dog breeds, not {num_classes} "
            f"classes; to train on your breeds use --model efficientnet_lite0"
        )
    if not (weights or weights_file):
        raise ValueError("imagenet_dogs is the pretrained network: it needs its ImageNet weights")
    m = efficientnet_lite.efficientnet_lite0(efficientnet_lite.IMAGENET_CLASSES, weights, weights_file)
    freeze_features(m.features, unfreeze_blocks)
    return ImageNetSubset(m)


class ScratchCNN(nn.Module):
    """The original dog project's baseline, trained from scratch on 224x224 crops."""

    def __init__(self, num_classes: int, dropout: float = 0.5):
        super().__init__()
        layers: list[nn.Module] = []
        for c_in, c_out in ((3, 16), (16, 32), (32, 64)):
            layers += [nn.Conv2d(c_in, c_out, 3, padding=1), nn.ReLU(inplace=True), nn.MaxPool2d(2)]
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Sequential(
            nn.Flatten(),
            nn.Dropout(dropout),
            nn.Linear(64 * 28 * 28, 500),
            nn.ReLU(inplace=True),
            nn.Dropout(dropout),
            nn.Linear(500, num_classes),
        )

    def forward(self, x):
        return self.classifier(self.features(x))


@register_model("scratch_cnn", pretrained=False)
def scratch_cnn(
    num_classes: int, weights: str | None = None, weights_file: str | None = None, dropout: float = 0.5
) -> nn.Module:
    if weights or weights_file:
        raise ValueError("scratch_cnn has no pretrained weights; use --weights none")
    return ScratchCNN(num_classes, dropout)
