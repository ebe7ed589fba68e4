"""The settings of a served model, each defined once: its default and what it does.

training/export/torchscript.py writes them into the archive's model-config.yaml: TorchServe's own
keys (workers, batching) at the top, the handler's in its ``handler:`` section, where the
handler reads them (``HandlerSettings.read``). Edit model-config.yaml to change a served
model without exporting it again. The archive ships this module with the handler.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any


@dataclass(frozen=True)
class ServerSettings:
    """TorchServe's per-model keys (model-config.yaml, top level)."""

    # Worker processes. Workers x threads should not exceed the cores: TorchServe's own
    # default (a worker per core, each using every core) oversubscribes the machine. The
    # export cannot know the serving machine, so it writes one unless told (--workers);
    # `make` exports with as many as the cores of the machine it runs on.
    workers: int = 1
    # Images per forward pass at most, and how long (ms) a request waits for others to
    # share it: a short delay fills batches under load and costs a lone request little,
    # while 0 makes TorchServe poll and a lone request wait longer.
    batch_size: int = 8
    max_batch_delay: int = 2
    response_timeout: int = 120  # seconds before TorchServe gives up on a batch

    def to_config(self) -> dict:
        return {
            "minWorkers": self.workers,
            "maxWorkers": self.workers,
            "batchSize": self.batch_size,
            "maxBatchDelay": self.max_batch_delay,
            "responseTimeout": self.response_timeout,
        }


@dataclass(frozen=True)
class HandlerSettings:
    """The image classifier's settings (model-config.yaml, ``handler:`` section), beside
    the eval preprocessing (handlers/preset.py) and the model's name."""

    top_k: int = 5  # labels returned per image (at most the number of classes)
    # torch threads of each worker (torch.set_num_threads; None: torch's own choice, every
    # core); see ServerSettings.workers.
    threads: int | None = 1
    # A large JPEG is decoded by libjpeg at 1/2, 1/4 or 1/8 scale, keeping its short side
    # at least jpeg_draft x resize_size; 0: always in full. Most of a phone photo's
    # decoding time goes, within the tolerance tests/test_presets.py states.
    jpeg_draft: float = 1.25
    # How the worker optimises the model it loads: onednn, jit or none (handlers/optimize.py).
    optimize: str = "onednn"
    # optimize onednn: the batch sizes to compile a copy of the model for, 1 among them;
    # None: 1, 2, 4, ... up to batchSize.
    onednn_batches: tuple[int, ...] | None = None
    # The forward pass's number format on CPU workers: fp32, bf16 (the export's bfloat16
    # copy, gated for accuracy at export) or auto: bf16 where the CPU has bf16 units, else
    # fp32 (handlers/precision.py). A model file without a bf16 copy runs in fp32.
    precision: str = "auto"
    half: bool = False  # CUDA workers: the forward pass under fp16 autocast
    gpu_decode: bool = False  # CUDA workers: JPEGs decoded by nvJPEG, preprocessed on the GPU
    # An int8 model (training/export/torchscript.py --quantize int8): the torch.backends.quantized
    # engine it was made for, set before loading; None for a float model.
    quantized_engine: str | None = None

    def min_short(self, resize_size: int) -> int:
        """The short side a large JPEG is decoded down to, at least (``jpeg_draft`` x
        ``resize_size``); 0: decoded in full. The handler's rule, which the benchmarks use."""
        return round(float(self.jpeg_draft) * resize_size)

    def to_config(self) -> dict:
        """The section's keys; those left at None are not written."""
        out = {}
        for k, v in asdict(self).items():
            if v is not None:
                out[k] = list(v) if isinstance(v, tuple) else v
        return out

    @classmethod
    def read(cls, section: dict):
        """The settings of a model-config.yaml ``handler:`` section; keys it lacks keep
        their defaults, keys of other settings (the preprocessing, the name) are ignored."""
        known = {f.name for f in fields(cls)}
        # YAML writes the tuple-valued settings (onednn_batches, class ranges) as lists.
        values: dict[str, Any] = {
            k: tuple(v) if isinstance(v, list) else v for k, v in section.items() if k in known
        }
        return cls(**values)


@dataclass(frozen=True)
class DogBreedSettings(HandlerSettings):
    """The dog-breed handler's settings, beside the image classifier's. The classes are
    ImageNet-1k indices (first, last); the shares are sums of the ImageNet classifier's
    probabilities over a group (handlers/dog_breeds.py's verdict), measured on the real
    photos of ../shared/photos."""

    # The dog breeds, Chihuahua to Mexican hairless.
    dog_classes: tuple[int, int] = (151, 268)
    # Dingo, dhole and African hunting dog: wild dogs the classifier takes short-haired
    # breeds for (a Rhodesian ridgeback: dhole 0.21, dingo 0.07, hunting dog 0.06, the
    # breeds 0.25). They count for a dog against the other animals, never make one alone.
    wild_dog_classes: tuple[int, int] = (273, 275)
    # Every animal, tench to puffer: fish, birds, reptiles, insects, mammals, dogs among them.
    animal_classes: tuple[int, int] = (0, 397)
    # A dog: the breeds' share at least this, and the breeds and wild dogs together more than
    # the other animals. The breeds' share measured: dogs 0.72 or more but the ridgeback 0.25;
    # people 0.10 at most, objects 0.03; cats up to 0.23, which the comparison rules out.
    dog_min_share: float = 0.2
    # Not a dog, and the animals' share at least this: an animal, not a person, whatever the
    # face check finds. Measured: people 0.40 at most, other animals 0.69 or more.
    animal_min_share: float = 0.5
    # The face check's grey copy is at most this many pixels long (a bound on its work).
    face_max_side: int = 600


# model-config.yaml's handler name -> the settings its handler reads.
SETTINGS = {"image_classifier": HandlerSettings, "dog_breeds": DogBreedSettings}
