"""Any torchvision classification model by name, through torchvision's own registry.

``get_model("convnext_tiny", num_classes=10)`` builds torchvision's network
(``torchvision.models.get_model``, weights from ``get_model_weights``) with its last
Linear replaced for the number of classes. Names the project registers itself
(resnet50, mobilenet_v2, ...) keep their own builders and heads: the registry asks
this module only for the others (``register_fallback``).

What the rest of the project needs to know about a network is found, not listed:

- the head: the module under ``fc``, ``classifier``, ``head`` or ``heads`` that holds
  a Linear (the last Linear in it is the one replaced); staged fine-tuning trains it first;
- the feature blocks, for ``unfreeze_blocks``: ResNet's layer1..layer4, or the children
  of ``features``, ``trunk_output`` (RegNet), ``encoder.layers`` (ViT), ``layers``
  (MNASNet), ``blocks`` (MaxViT), ShuffleNet's stages; GoogLeNet and Inception have none;
- the eval preprocessing of pretrained weights: the sizes, mean and std of their own
  ``weights.transforms()`` (EfficientNetV2-S expects 384 px, not 224).
"""

from __future__ import annotations

import functools

import torchvision
from torch import nn
from torchvision import models as tvm

from handlers.preset import EvalPreset
from models.augment import TrainPreset
from models.registry import ModelSpec, register_fallback
from models.weights import torchvision_model

HEADS = ("fc", "classifier", "head", "heads")
BLOCK_SEQUENCES = ("features", "trunk_output", "encoder.layers", "layers", "blocks")
STAGES = (("layer1", "layer2", "layer3", "layer4"), ("stage2", "stage3", "stage4", "conv5"))
# torchvision's own training preset (references/classification/presets.py): random crops
# of 8-100% of the area, horizontal flips, no rotation.
TRAIN_PRESET = TrainPreset(rotation=0.0, hflip=0.5, scale=(0.08, 1.0))
EXAMPLES = (
    "resnet18",
    "efficientnet_v2_s",
    "convnext_tiny",
    "regnet_y_400mf",
    "vit_b_16",
    "mobilenet_v3_small",
)
DESCRIPTION = f"any torchvision classification model, e.g. {', '.join(EXAMPLES)}"


@functools.lru_cache(maxsize=1)
def names() -> frozenset[str]:
    """torchvision's classification models (detection, segmentation, video and quantized
    models live in submodules and are left out)."""
    return frozenset(tvm.list_models(module=torchvision.models))


def find_head(model: nn.Module) -> tuple[str, nn.Module, str, nn.Linear]:
    """(head attribute, the module holding the head's last Linear, that Linear's name in
    it, the Linear). Raises ValueError when no attribute of HEADS holds a Linear."""
    for attr in HEADS:
        head = getattr(model, attr, None)
        if isinstance(head, nn.Linear):
            return attr, model, attr, head
        if isinstance(head, nn.Module):
            linears = [(n, m) for n, m in head.named_modules() if isinstance(m, nn.Linear)]
            if linears:
                path, linear = linears[-1]
                parent, _, child = path.rpartition(".")
                return attr, head.get_submodule(parent) if parent else head, child, linear
    raise ValueError(
        f"{type(model).__name__} has no Linear classifier under "
        f"{', '.join(HEADS)}: its head cannot be replaced for your classes"
    )


def feature_blocks(model: nn.Module) -> list[nn.Module] | None:
    """The network's feature blocks in forward order, or None where it has no such sequence."""
    for stages in STAGES:
        if all(hasattr(model, s) for s in stages):
            return [getattr(model, s) for s in stages]
    for path in BLOCK_SEQUENCES:
        try:
            seq = model.get_submodule(path)
        except AttributeError:
            continue
        if isinstance(seq, (nn.Sequential, nn.ModuleList)) and len(seq) > 1:
            return list(seq)
    return None


def freeze_all_but(model: nn.Module, first_trained: nn.Module) -> None:
    """Stop training every parameter registered before ``first_trained``'s first one
    (registration follows the forward order in torchvision's networks)."""
    start = next(first_trained.parameters())
    for p in model.parameters():
        if p is start:
            return
        p.requires_grad_(False)


def unfreeze_last_blocks(model: nn.Module, name: str, n: int) -> None:
    """Train the last ``n`` feature blocks and what follows them; freeze what comes before
    (n = 0: the head alone)."""
    blocks = feature_blocks(model)
    if blocks is None:
        raise ValueError(
            f"unfreeze_blocks: {name} has no sequence of feature blocks; leave it "
            f"out to train every layer, or train the head first with --head-epochs"
        )
    if not 0 <= n <= len(blocks):
        raise ValueError(f"unfreeze_blocks must be in 0..{len(blocks)} for {name}, got {n}")
    first = blocks[-n] if n else getattr(model, find_head(model)[0])
    freeze_all_but(model, first)


def build(
    tv_name: str,
    num_classes: int,
    weights: str | None = None,
    weights_file: str | None = None,
    unfreeze_blocks: int | None = None,
    **unknown,
) -> nn.Module:
    """torchvision's ``tv_name`` with a head of ``num_classes``; every layer trains unless
    ``unfreeze_blocks`` says how many of the last feature blocks do."""
    if unknown:
        raise ValueError(
            f"{tv_name} (torchvision) takes no {', '.join(sorted(unknown))}; "
            f"its options: weights, weights_file, unfreeze_blocks"
        )
    model = torchvision_model(tv_name, weights, weights_file)
    _, parent, child, linear = find_head(model)
    # Pretrained weights with as many classes as they were trained on keep their classifier.
    if not ((weights or weights_file) and linear.out_features == num_classes):
        setattr(parent, child, nn.Linear(linear.in_features, num_classes))
    if unfreeze_blocks is not None:
        unfreeze_last_blocks(model, tv_name, unfreeze_blocks)
    return model


def weights_preset(tv_name: str, weights: str) -> EvalPreset:
    """The eval preset of ``tv_name``'s weights ``weights`` (DEFAULT, IMAGENET1K_V1, ...),
    from their own transforms. Their interpolation is not carried: the project resizes
    bilinearly (bicubic weights, e.g. EfficientNet-B*, see slightly different inputs)."""
    enum = tvm.get_model_weights(tv_name)
    try:
        t = enum[weights].transforms()
    except KeyError:
        known = ", ".join(["DEFAULT", *sorted(enum.__members__.keys() - {"DEFAULT"})])
        raise ValueError(f"unknown weights {weights!r} for {tv_name}; known: {known}, none") from None
    return EvalPreset(
        resize_size=t.resize_size[0], crop_size=t.crop_size[0], mean=tuple(t.mean), std=tuple(t.std)
    )


def head_attribute(model: nn.Module) -> str:
    return find_head(model)[0]


@functools.cache
def resolve(name: str) -> ModelSpec | None:
    """The spec of torchvision's classification model ``name``; None for other names."""
    if name not in names():
        return None
    # The head is found on the built network: building one only to look (RegNet cannot be
    # built on the meta device) would cost as much as the build itself.
    return ModelSpec(
        name,
        functools.partial(build, name),
        TRAIN_PRESET,
        pretrained=True,
        head=None,
        eval_preset=weights_preset(name, "DEFAULT"),
        weights_preset=functools.partial(weights_preset, name),
        find_head=head_attribute,
    )


register_fallback(resolve, DESCRIPTION)
