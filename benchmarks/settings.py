"""The sizes and step counts of one benchmark run, and the key of its Markdown sections.

`python -m benchmarks.run` builds one `Settings` from its options (`--quick`
shrinks every size); each benchmark reads the fields it needs.
"""

from __future__ import annotations

import dataclasses

PRECISIONS = ("float32", "mixed_bfloat16")
# name -> (label, builder arguments); "keras_*" are plain keras.applications models.
PRETRAIN_MODELS = {
    "vgg16": ("rmib VGG16", ("vgg16", False)),
    "vgg16_cbam": ("rmib VGG16-CBAM", ("vgg16", True)),
    "keras_vgg16": ("keras.applications VGG16", ("keras", "VGG16")),
    "resnet50": ("rmib ResNet50", ("resnet50", False)),
    "resnet50_cbam": ("rmib ResNet50-CBAM", ("resnet50", True)),
    "keras_resnet50": ("keras.applications ResNet50", ("keras", "ResNet50")),
}


@dataclasses.dataclass
class Settings:
    """Sizes and step counts of one run; `quick_settings()` shrinks them for a smoke test."""

    conv_shape: tuple = (8, 128, 128, 256)
    matmul_size: int = 4096
    peak_repeats: int = 3
    image_size: int = 224  # pretrain_throughput; --image-size 480 for the training size
    batch_size: int = 4
    warmup_steps: int = 3
    timed_steps: int = 5
    models: tuple = tuple(PRETRAIN_MODELS)
    precisions: tuple = PRECISIONS
    photo_shape: tuple = (2848, 4288)
    large_photo_shape: tuple = (4000, 6000)
    tile: int = 512
    naive_patch: int = 160
    naive: bool = True
    memory_check: bool = True
    quick: bool = False
    tag: str = ""
    idrid_rows: tuple = ()
    idrid_minutes: float = 30.0
    idrid_lever: str | None = None
    taskset: int | None = None

    @classmethod
    def quick_settings(cls) -> Settings:
        return cls(
            conv_shape=(1, 32, 32, 32),
            matmul_size=256,
            peak_repeats=2,
            image_size=32,
            batch_size=2,
            warmup_steps=1,
            timed_steps=1,
            models=("vgg16", "keras_vgg16"),
            photo_shape=(96, 128),
            large_photo_shape=(128, 160),
            tile=64,
            naive_patch=32,
            quick=True,
        )


def section_key(name: str, settings: Settings) -> str:
    """Runs at non-default sizes get their own section beside the default one."""
    default = Settings()
    if settings.tag:
        return f"{name}_{settings.tag}"
    if name == "idrid_real" and not settings.quick and settings.idrid_minutes != 30.0:
        return f"{name}_screening_{settings.idrid_minutes:g}min".replace(".", "_")
    if name == "pretrain_throughput" and not settings.quick:
        if (settings.image_size, settings.batch_size) != (default.image_size, default.batch_size):
            return f"{name}_{settings.image_size}px_batch{settings.batch_size}"
    return name
