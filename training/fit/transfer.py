"""What fine-tuning a pretrained network needs beyond the model's own freezing:
every layer trainable, and BatchNorm statistics kept as the weights came.

A BatchNorm layer in train mode normalises each batch by the batch's own statistics and
moves its running statistics towards them; in eval mode it uses the running ones. A
pretrained layer's running statistics describe the features the later layers learned to
read. Left in train mode on a small batch of unlike images (digits, not photos), the
frozen features a head trains on are not those it is evaluated on (docs/training.md has
the measurements).
"""

from __future__ import annotations

from torch import nn

# --bn-stats: which BatchNorm layers keep their running statistics while training.
BN_STATS = ("update", "frozen-parts", "frozen")


def train_all_layers(model: nn.Module) -> int:
    """Make every parameter trainable, whatever the builder froze; returns how many
    tensors were frozen before."""
    frozen = [p for p in model.parameters() if not p.requires_grad]
    for p in frozen:
        p.requires_grad_(True)
    return len(frozen)


def keep_bn_statistics(model: nn.Module, mode: str) -> int:
    """After ``model.train()``: put the BatchNorm layers ``mode`` names in eval mode, so that
    they normalise with, and keep, their running statistics. ``update``: none (every layer
    follows the batches, as the original projects trained); ``frozen-parts``: the layers
    whose parameters are not trained in this stage; ``frozen``: all. Returns how many."""
    if mode not in BN_STATS:
        raise ValueError(f"bn-stats {mode!r}; known: {', '.join(BN_STATS)}")
    if mode == "update":
        return 0
    kept = 0
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and (
            mode == "frozen" or not any(p.requires_grad for p in m.parameters())
        ):
            m.eval()
            kept += 1
    return kept
