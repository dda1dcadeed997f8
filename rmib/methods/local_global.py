"""Training of the fused local-global U-Net (Yan et al., ISBI 2019) in its four phases.

    global  GlobalNet alone on whole photographs resized to `global_size`
            (`[train]`: the recipes use Adam 2e-4 with polynomial decay)
    local   LocalNet alone on lesion-aware full-resolution patches (same settings)
    fusion  the fusion module only, everything before it frozen (10 epochs, 2e-4)
    joint   everything unfrozen (60 epochs, 1e-4)

Each phase is one `rmib.training.fit` call with its own files in the run
directory (`history_<phase>.csv`, `checkpoints/last_<phase>.keras` ...), so a
resumed run skips the finished phases and continues the one it was in. The
next phase starts from the best weights of the previous ones, moved by their
place in the model (`copy_matching_weights`). The last phase writes `model.keras`; the run's
metadata "network" says whether it is the fused model or, for a run of
["global"] or ["local"] alone (the paper's ablation), a single net, and
`rmib.models.local_global.LocalGlobalSegmenter` predicts with any of them.

Loss (eq. 1): L = l1 * L_global + l2 * L_local + l3 * phi(theta), both terms
the weighted cross-entropy of eq. 2 (`rmib.losses.weighted_bce`), phi the
squared L2 norm of every convolution kernel (Keras' L2 regulariser, i.e.
weight decay; the paper says "e.g. L2 norm"). The single nets train on their
own term plus l3 * phi.

Encoders: by default GlobalNet and LocalNet are plain U-Nets trained from
scratch, as in the paper. With `--encoder RUN_DIR` (a `rmib pretrain` run)
both nets (or those of `[local_global] encoder_nets`) get a copy of the
stage-1 classifier's backbone as their encoder, with the U-Net decoder over its
skip taps (`rmib.models.unet.build_encoder_unet_trunk`), frozen in every phase
unless `freeze_encoder = "no"` (as the encoder-decoder's; a backbone name with
`encoder_nets` set builds one from `--weights`). `fine_tune_after` is refused:
the phases decide what trains. A backbone's deepest tap is P5, so the paper's
depth 6 becomes 5 on one.

Data: every photograph is preprocessed once (IDRiD centre crop when it is at
least 2816 x 3328, then `cfg.preprocessing`). GlobalNet sees it resized to
`global_size` with its mask resized by area, i.e. the lesion fraction of each
pixel (a nearest-neighbour resize would erase most microaneurysms). The fused
net sees (whole photograph resized, a full-resolution patch, the patch's box)
with targets (global mask resized, patch mask); patches are lesion-aware
(`cfg.pos_fraction`). Augmentation: `cfg.augment` ("free": rotation, zoom,
flips, noise) for the single nets; quarter turns only for the fused net,
applied to the photograph, the patch and the box together.
"""

from __future__ import annotations

import dataclasses
import math

import keras
import numpy as np
import tensorflow as tf

from rmib import io, training
from rmib.data import augment as augment_lib
from rmib.data.pipeline import (
    AUTOTUNE,
    PatchSampler,
    PreprocessedCache,
    Preprocessing,
    load_examples,
    patch_dataset,
)
from rmib.errors import BadInputError, RmibError
from rmib.losses import weighted_bce
from rmib.models.local_global import (
    BACKBONE_MAX_DEPTH,
    LocalGlobalSegmenter,
    _fits_centre_crop,
    build_global_net,
    build_local_global,
    build_local_net,
    copy_backbone,
    copy_matching_weights,
    default_depths,
    resize_global,
    set_fusion_only_trainable,
)
from rmib.segment_config import LOCAL_GLOBAL_PHASES, SegmentConfig

PHASES = LOCAL_GLOBAL_PHASES
NETWORK_OF_PHASE = {"global": "global", "local": "local", "fusion": "fused", "joint": "fused"}
ENCODER_DECODER_PATCH = 160  # SegmentConfig's default patch, the RMIB paper's
PAPER_PATCH = 256  # LocalNet's patch in Yan et al.
PAPER_LEARNING_RATE = 2e-4  # GlobalNet and LocalNet, Adam with polynomial decay


# --------------------------------------------------------------------------- loss


@keras.saving.register_keras_serializable(package="rmib")
class WeightedBCE(keras.losses.Loss):
    """Eq. 2 of Yan et al. (ISBI 2019) as a Keras loss: `rmib.losses.weighted_bce`.

    Args:
        gamma: scale of the positive weight |Y-| / (gamma * |Y+|).
        name: the loss's name.
        **kwargs: other `keras.losses.Loss` arguments.
    """

    def __init__(self, gamma: float = 1.0, name: str = "weighted_bce", **kwargs):
        super().__init__(name=name, **kwargs)
        if not gamma > 0:
            raise ValueError(f"gamma must be positive, got {gamma}")
        self.gamma = float(gamma)

    def call(self, y_true, y_pred):
        return weighted_bce(y_true, y_pred, gamma=self.gamma)

    def get_config(self):
        return {**super().get_config(), "gamma": self.gamma}


def l2_penalty(kernels):
    """phi(theta) of eq. 1: the squared L2 norm (sum of squares) of the kernels, float32."""
    return sum(
        (keras.ops.sum(keras.ops.square(keras.ops.cast(k, "float32"))) for k in kernels),
        keras.ops.convert_to_tensor(0.0, "float32"),
    )


def combined_loss(
    y_global, p_global, y_local, p_local, kernels, lambdas=(1.0, 1.0, 1e-4), gamma=1.0
):
    """Eq. 1 of Yan et al.: l1 * L_global + l2 * L_local + l3 * phi(theta).

    What the fused model's compiled loss computes (the weighted output losses
    plus the kernels' L2 regularisers); written out for tests and reports.

    Args:
        y_global, p_global: GlobalNet targets and probabilities (B, G, G[, 1]).
        y_local, p_local: patch targets and fused probabilities (B, p, p[, 1]).
        kernels: the convolution kernels phi sums over.
        lambdas: (l1, l2, l3).
        gamma: gamma of eq. 2.

    Returns:
        Scalar float32 tensor.
    """
    l1, l2, l3 = lambdas
    return (
        l1 * weighted_bce(y_global, p_global, gamma)
        + l2 * weighted_bce(y_local, p_local, gamma)
        + l3 * l2_penalty(kernels)
    )


def kernels_of(model) -> list:
    """The convolution kernels of a model (every weight named "kernel")."""
    return [w for w in model.weights if w.path.rsplit("/", 1)[-1] == "kernel"]


# --------------------------------------------------------------------------- settings


@dataclasses.dataclass(frozen=True)
class Sizes:
    """The resolved sizes of a run: what `cfg` asks for with the paper's defaults filled in."""

    global_size: int
    patch_size: int
    global_depth: int
    local_depth: int
    base_filters: int
    max_filters: int
    fusion_filters: int

    @property
    def depths(self) -> dict:
        return {"global": self.global_depth, "local": self.local_depth}


def resolve_sizes(cfg: SegmentConfig) -> Sizes:
    """Fill in the paper's per-lesion depths and LocalNet's 256-px patch.

    `patch_size` is 256 when `cfg.patch_size` is the encoder-decoder's default
    160 (the two methods share SegmentConfig), else what the user set. A net
    on a backbone encoder (`encoder_nets`) has at most `BACKBONE_MAX_DEPTH`
    (5) levels: the paper's depth 6 becomes 5 there.

    Raises:
        RmibError: sizes the U-Nets cannot take (not multiples of 2**depth),
            a depth set beyond a backbone encoder's deepest tap.
    """
    lg = cfg.local_global
    defaults = default_depths(cfg.lesion)
    chosen = {"global": lg.global_depth, "local": lg.local_depth}
    depths = {net: chosen[net] or defaults[net] for net in chosen}
    for net in encoder_nets(cfg):
        if chosen[net] > BACKBONE_MAX_DEPTH:
            raise RmibError(
                f"local_global.{net}_depth {chosen[net]}: a backbone encoder has at most "
                f"{BACKBONE_MAX_DEPTH} pooling levels (its deepest skip tap is "
                f"P{BACKBONE_MAX_DEPTH}); choose 1 to {BACKBONE_MAX_DEPTH}, or 0"
            )
        depths[net] = min(depths[net], BACKBONE_MAX_DEPTH)
    global_depth, local_depth = depths["global"], depths["local"]
    patch = PAPER_PATCH if cfg.patch_size == ENCODER_DECODER_PATCH else cfg.patch_size
    for name, size, depth in (
        ("global_size", lg.global_size, global_depth),
        ("patch_size", patch, local_depth),
    ):
        if size % 2**depth:
            raise RmibError(
                f"{name} {size} is not a multiple of 2**{depth} = {2**depth}, which a U-Net "
                f"with {depth} pooling layers needs; choose another size or depth"
            )
    return Sizes(
        global_size=lg.global_size,
        patch_size=patch,
        global_depth=global_depth,
        local_depth=local_depth,
        base_filters=lg.base_filters,
        max_filters=lg.max_filters,
        fusion_filters=lg.fusion_filters or lg.base_filters,
    )


def encoder_nets(cfg: SegmentConfig) -> tuple:
    """The nets ("global", "local") whose encoder is `cfg.encoder` rather than the U-Net's.

    `[local_global] encoder_nets` when set; otherwise both when `cfg.encoder`
    is a stage-1 run (a directory or a .keras file) and neither when it is a
    backbone name (SegmentConfig's default "vgg16" is the encoder-decoder's;
    the paper's U-Nets are plain).
    """
    from rmib.segment import _is_run

    chosen = cfg.local_global.encoder_nets
    if chosen:
        return tuple(net for net in ("global", "local") if net in chosen)
    return ("global", "local") if _is_run(cfg.encoder) else ()


@dataclasses.dataclass(frozen=True)
class EncoderSetup:
    """The backbone encoder of a run's GlobalNet and/or LocalNet.

    Attributes:
        nets: which nets have it ("global", "local").
        build: () -> the source backbone (the stage-1 classifier's, or one
            built by name with `cfg.weights`), made on the first call and kept;
            each net gets a `copy_backbone` of it.
        frozen: keep the encoders' weights frozen (`cfg.freeze_encoder`, as
            the encoder-decoder's: a stage-1 encoder unless "no"; one built by
            name when "yes", or "auto" with weights).
        info: what goes into the run's metadata.
    """

    nets: tuple
    build: object
    frozen: bool
    info: dict


def encoder_setup(cfg: SegmentConfig) -> EncoderSetup | None:
    """The run's backbone encoders (`encoder_nets`), None for plain U-Nets.

    Checks the stage-1 run without loading it (`rmib.segment.encoder_factory`).

    Raises:
        RmibError: a missing or wrong stage-1 run, an unknown backbone name,
            `fine_tune_after` (the phases decide what trains; see the message).
    """
    if cfg.fine_tune_after:
        raise RmibError(
            f"fine_tune_after {cfg.fine_tune_after}: the local-global U-Net trains in phases, "
            'not in a frozen and a fine-tuning part; set freeze_encoder = "no" (config) '
            "to train its backbone encoders in the global, local and joint phases"
        )
    nets = encoder_nets(cfg)
    if not nets:
        return None
    from rmib.segment import encoder_factory

    try:
        build_source, info, frozen = encoder_factory(cfg)
    except RmibError as exc:
        raise RmibError(
            f"{exc}; the local-global U-Net takes a stage-1 encoder (a `rmib pretrain` "
            "run directory or its .keras file) or a backbone name"
        ) from None
    info = {**info, "encoder_nets": list(nets), "encoder_frozen": frozen}
    loaded = []

    def build():
        # Loaded once per run: every phase copies its encoders from it.
        if not loaded:
            loaded.append(build_source())
        return loaded[0]

    return EncoderSetup(nets=nets, build=build, frozen=frozen, info=info)


def phase_config(cfg: SegmentConfig, phase: str, validate: bool):
    """The `TrainConfig` of one phase (epochs, learning rate, schedule, monitor).

    "global" and "local" use `cfg.train`, except that a learning rate and
    schedule left at SegmentConfig's defaults (1e-3, constant, the
    encoder-decoder's) become the paper's 2e-4 with polynomial decay.
    "fusion" and "joint" use `cfg.local_global`'s epochs and rates with a
    constant rate. `epochs_per_phase` > 0 sets every phase's epochs. Without
    validation images a "val_..." monitor becomes "loss".
    """
    lg = cfg.local_global
    changes = {}
    default = SegmentConfig().train
    if phase in ("global", "local") and (cfg.train.learning_rate, cfg.train.lr_schedule) == (
        default.learning_rate,
        default.lr_schedule,
    ):
        # `[train]` left at the encoder-decoder's defaults: the paper's Adam 2e-4, poly decay.
        changes = dict(learning_rate=PAPER_LEARNING_RATE, lr_schedule="poly")
    if phase == "fusion":
        changes = dict(
            epochs=lg.fusion_epochs, learning_rate=lg.fusion_learning_rate, lr_schedule="constant"
        )
    elif phase == "joint":
        changes = dict(
            epochs=lg.joint_epochs, learning_rate=lg.joint_learning_rate, lr_schedule="constant"
        )
    if lg.epochs_per_phase:
        changes["epochs"] = lg.epochs_per_phase
    if not validate and cfg.train.monitor.startswith("val_"):
        changes.update(monitor="loss", monitor_mode="min")
    return dataclasses.replace(cfg.train, **changes)


# --------------------------------------------------------------------------- data


@dataclasses.dataclass
class Photographs:
    """Preprocessed photographs with their GlobalNet views.

    Attributes:
        examples: `rmib.data.pipeline.Example`s (full resolution, mask, FOV).
        global_images: each photograph resized to global_size, uint8.
        global_masks: each mask resized by area (lesion fraction), float32 (G, G).
        cropped: how many photographs got the IDRiD centre crop.
    """

    examples: list
    global_images: list
    global_masks: list
    cropped: int = 0


def _preprocessing_for(record, method: str, centre_crop: bool) -> Preprocessing:
    if centre_crop:
        try:
            width, height = io.image_size(record.image)
        except BadInputError:  # load_examples reports the file as the run's on_bad says
            return Preprocessing(method=method)
        if _fits_centre_crop((height, width)):
            return Preprocessing(method=method, centre_crop=True)
    return Preprocessing(method=method)


def load_photographs(records, cfg: SegmentConfig, global_size: int, cache=None, problems=None):
    """Preprocess `records` for `cfg.lesion` and make their GlobalNet views."""
    cache = cache or PreprocessedCache(cfg.cache_dir or None)
    examples, global_images, global_masks, cropped = [], [], [], 0
    for record in records:
        prep = _preprocessing_for(record, cfg.preprocessing, cfg.local_global.centre_crop)
        loaded, _ = load_examples([record], prep, cfg.lesion, cache, cfg.on_bad, problems)
        for example in loaded:
            examples.append(example)
            cropped += int(prep.centre_crop)
            global_images.append(resize_global(example.image, global_size))
            mask = np.asarray(example.mask) > 0
            global_masks.append(resize_global(mask.astype(np.float32), global_size))
    return Photographs(examples, global_images, global_masks, cropped)


class BoxPatchSampler(PatchSampler):
    """`PatchSampler` that also says where the patch lies: its normalised box."""

    def sample_with_box(self, rng):
        """(photograph index, patch uint8 (p, p, 3), mask uint8 (p, p), box float32 (4,)).

        The box is (top / H, left / W, (top + p) / H, (left + p) / W) of the
        photograph (beyond 1 when the photograph is smaller than the patch).
        """
        index = int(rng.integers(len(self.examples)))
        example = self.examples[index]
        y, x = self._centre(index, rng)
        p = self.patch
        height, width = example.image.shape[:2]
        top = int(np.clip(y - p // 2, 0, max(height - p, 0)))
        left = int(np.clip(x - p // 2, 0, max(width - p, 0)))
        image, mask = self.crop(example, top, left)
        box = np.array(
            [top / height, left / width, (top + p) / height, (left + p) / width], np.float32
        )
        return index, image, mask, box


def rotate_box(box, k):
    """A normalised (y0, x0, y1, x1) box after k counter-clockwise quarter turns
    of its image (`tf.image.rot90`): one turn maps (y, x) to (1 - x, y)."""
    box = tf.convert_to_tensor(box, tf.float32)
    y0, x0, y1, x1 = tf.unstack(box, axis=-1)
    turns = tf.stack(
        [
            tf.stack([y0, x0, y1, x1], -1),
            tf.stack([1 - x1, y0, 1 - x0, y1], -1),
            tf.stack([1 - y1, 1 - x1, 1 - y0, 1 - x0], -1),
            tf.stack([x0, 1 - y1, x1, 1 - y0], -1),
        ]
    )
    return tf.gather(turns, tf.math.floormod(tf.cast(k, tf.int32), 4))


def rotate_fused_example(global_image, global_mask, patch, patch_mask, box, k):
    """Quarter-turn augmentation of one fused example: the same k turns for all of it.

    Args:
        global_image, global_mask: (G, G, C) tensors.
        patch, patch_mask: (p, p, C) tensors.
        box: (4,) the patch's normalised box in the photograph.
        k: number of counter-clockwise quarter turns (`tf.image.rot90`).

    Returns:
        The five, rotated; the patch stays the photograph's pixels inside the box.
    """
    turned = [tf.image.rot90(t, k) for t in (global_image, global_mask, patch, patch_mask)]
    return (*turned, rotate_box(box, k))


def augment_soft_pair(
    image, mask, seed, mode="free", max_rotation=180.0, zoom_range=0.1, noise_std=4.0
):
    """Augment an image and a soft (fractional) mask identically.

    As `rmib.data.augment.augment_pair`, except that in "free" mode the mask
    is resampled bilinearly and not rounded, so GlobalNet's lesion fractions survive.
    """
    if mode == "none":
        return image, mask
    if mode != "free":
        return augment_lib.augment_pair(image, mask, seed, mode=mode)
    seeds = tf.random.experimental.stateless_split(tf.cast(seed, tf.int64), num=5)
    channels = image.shape[-1]
    stack = tf.concat([image, mask], axis=-1)
    stack = tf.cond(
        tf.random.stateless_uniform([], seeds[0]) < 0.5,
        lambda: tf.reverse(stack, [1]),
        lambda: stack,
    )
    stack = tf.cond(
        tf.random.stateless_uniform([], seeds[1]) < 0.5,
        lambda: tf.reverse(stack, [0]),
        lambda: stack,
    )
    limit = max_rotation * math.pi / 180.0
    angle = tf.random.stateless_uniform([], seeds[2], -limit, limit)
    zoom = tf.random.stateless_uniform([], seeds[3], 1.0 - zoom_range, 1.0 + zoom_range)
    shape = tf.shape(stack)
    transform = augment_lib.rotation_zoom_transform(angle, zoom, shape[0], shape[1])
    stack = keras.ops.image.affine_transform(
        stack[None], transform[None], interpolation="bilinear", fill_mode="constant"
    )[0]
    image, mask = stack[..., :channels], stack[..., channels:]
    if noise_std > 0:
        image = image + tf.random.stateless_normal(tf.shape(image), seeds[4], stddev=noise_std)
    return tf.clip_by_value(image, 0.0, 255.0), tf.clip_by_value(mask, 0.0, 1.0)


def _epochs(start_epoch, epochs, make_epoch):
    return (
        tf.data.Dataset.range(start_epoch, max(epochs, start_epoch + 1))
        .flat_map(make_epoch)
        .prefetch(AUTOTUNE)
    )


def _cycled_order(rng, n, count):
    order = []
    while len(order) < count:
        order.extend(rng.permutation(n).tolist())
    return order[:count]


def global_dataset(
    photos: Photographs, batch_size, steps, *, augment="free", seed=0, start_epoch=0, epochs=1
):
    """Batches of (whole photograph resized float32 (G, G, 3), lesion fraction (G, G, 1))."""
    n = len(photos.global_images)
    size = photos.global_images[0].shape[0]
    per_epoch = steps * batch_size

    def generate(epoch):
        rng = np.random.default_rng([seed, 1, int(epoch)])
        for index in _cycled_order(rng, n, per_epoch):
            yield photos.global_images[index], photos.global_masks[index]

    signature = (
        tf.TensorSpec((size, size, 3), tf.uint8),
        tf.TensorSpec((size, size), tf.float32),
    )

    def make_epoch(epoch):
        ds = tf.data.Dataset.from_generator(generate, output_signature=signature, args=(epoch,))

        def finish(index, pair):
            image, mask = pair
            image, mask = augment_soft_pair(
                tf.cast(image, tf.float32),
                mask[..., None],
                augment_lib.example_seed(seed, epoch, index),
                mode=augment,
            )
            return image, mask

        return (
            ds.enumerate()
            .map(finish, num_parallel_calls=AUTOTUNE, deterministic=True)
            .batch(batch_size, drop_remainder=True)
        )

    return _epochs(start_epoch, epochs, make_epoch)


def fused_dataset(
    photos: Photographs,
    patch_size,
    batch_size,
    steps,
    *,
    pos_fraction=0.5,
    augment="rot90",
    seed=0,
    start_epoch=0,
    epochs=1,
):
    """Batches of ({"global_image", "patch", "box"}, {"global", "local"}) for the fused net.

    Patches are lesion-aware (`BoxPatchSampler`); with augment other than
    "none", each example turns by the same random multiple of 90 degrees
    as a whole (`rotate_fused_example`).
    """
    sampler = BoxPatchSampler(photos.examples, patch_size, pos_fraction)
    size = photos.global_images[0].shape[0]
    p = int(patch_size)
    per_epoch = steps * batch_size

    def generate(epoch):
        rng = np.random.default_rng([seed, 3, int(epoch)])
        for _ in range(per_epoch):
            index, patch, mask, box = sampler.sample_with_box(rng)
            yield photos.global_images[index], photos.global_masks[index], patch, mask, box

    signature = (
        tf.TensorSpec((size, size, 3), tf.uint8),
        tf.TensorSpec((size, size), tf.float32),
        tf.TensorSpec((p, p, 3), tf.uint8),
        tf.TensorSpec((p, p), tf.uint8),
        tf.TensorSpec((4,), tf.float32),
    )

    def make_epoch(epoch):
        ds = tf.data.Dataset.from_generator(generate, output_signature=signature, args=(epoch,))

        def finish(index, example):
            global_image, global_mask, patch, mask, box = example
            global_image = tf.cast(global_image, tf.float32)
            patch = tf.cast(patch, tf.float32)
            global_mask = global_mask[..., None]
            mask = tf.cast(mask, tf.float32)[..., None]
            if augment != "none":
                k = tf.random.stateless_uniform(
                    [], augment_lib.example_seed(seed, epoch, index), 0, 4, dtype=tf.int32
                )
                global_image, global_mask, patch, mask, box = rotate_fused_example(
                    global_image, global_mask, patch, mask, box, k
                )
            inputs = {"global_image": global_image, "patch": patch, "box": box}
            return inputs, {"global": global_mask, "local": mask}

        return (
            ds.enumerate()
            .map(finish, num_parallel_calls=AUTOTUNE, deterministic=True)
            .batch(batch_size, drop_remainder=True)
        )

    return _epochs(start_epoch, epochs, make_epoch)


# --------------------------------------------------------------------------- training


def _phase_model_builder(phase, sizes: Sizes, l2, trained: dict, encoders=None):
    frozen = bool(encoders and encoders.frozen)

    def backbones(*nets):
        # Each net gets its own copy of the source's layers its depth needs.
        wanted = [net for net in nets if encoders and net in encoders.nets]
        if not wanted:
            return {}
        source = encoders.build()
        return {
            net: copy_backbone(source, sizes.depths[net], name=f"{net}_backbone") for net in wanted
        }

    def global_net():
        return build_global_net(
            sizes.global_depth,
            sizes.base_filters,
            sizes.max_filters,
            l2,
            encoder=backbones("global").get("global"),
            freeze_encoder=frozen,
        )

    def local_net():
        return build_local_net(
            sizes.local_depth,
            sizes.base_filters,
            sizes.max_filters,
            l2,
            encoder=backbones("local").get("local"),
            freeze_encoder=frozen,
        )

    def fused():
        copies = backbones("global", "local")
        model = build_local_global(
            sizes.global_depth,
            sizes.local_depth,
            sizes.base_filters,
            sizes.max_filters,
            sizes.global_size,
            sizes.fusion_filters,
            l2,
            global_encoder=copies.get("global"),
            local_encoder=copies.get("local"),
            freeze_encoders=frozen,
        )
        if "fusion" in trained:
            sources = [trained["fusion"]]
        else:
            sources = [trained[name] for name in ("global", "local") if name in trained]
        for source in sources:
            copy_matching_weights(source, model)
        return set_fusion_only_trainable(
            model, fusion_only=phase == "fusion", freeze_encoders=frozen
        )

    return {"global": global_net, "local": local_net}.get(phase, fused)


def _start_epoch(run, phase, resume) -> int:
    state = run.read_state(phase) if resume else None
    return int(state.get("epoch", 0)) if state else 0


def _steps(cfg: SegmentConfig, phase: str, n_images: int) -> int:
    if cfg.train.steps_per_epoch:
        return cfg.train.steps_per_epoch
    batch = training.global_batch_size(cfg.train)
    if phase == "global":
        return max(1, math.ceil(n_images / batch))
    return max(1, cfg.patches_per_epoch // batch)


def _train_data(phase, photos, sizes, cfg, steps, start, epochs):
    seed = cfg.train.seed
    batch = training.global_batch_size(cfg.train)  # --batch-size is per replica
    common = dict(seed=seed, start_epoch=start, epochs=epochs)
    if phase == "global":
        return global_dataset(photos, batch, steps, augment=cfg.augment, **common)
    if phase == "local":
        return patch_dataset(
            photos.examples,
            sizes.patch_size,
            batch,
            steps,
            pos_fraction=cfg.pos_fraction,
            augment=cfg.augment,
            **common,
        )
    augment = "none" if cfg.augment == "none" else "rot90"
    return fused_dataset(
        photos,
        sizes.patch_size,
        batch,
        steps,
        pos_fraction=cfg.pos_fraction,
        augment=augment,
        **common,
    )


def _compile_arguments(phase, cfg: SegmentConfig):
    # No Keras AUC metric: over every pixel of every batch it costs more than a
    # small U-Net's step; the validation callback measures AUPR on whole images.
    lg = cfg.local_global
    if phase in ("global", "local"):
        return dict(loss=WeightedBCE(cfg.gamma), compile_kwargs=None)
    return dict(
        loss={"global": WeightedBCE(cfg.gamma), "local": WeightedBCE(cfg.gamma)},
        compile_kwargs={"loss_weights": {"global": lg.lambda_global, "local": lg.lambda_local}},
    )


def run_metadata(
    cfg: SegmentConfig,
    sizes: Sizes,
    network: str,
    centre_crop: bool,
    train_records=(),
    val_records=(),
    encoders: EncoderSetup | None = None,
) -> dict:
    """The metadata of a local-global run (rmib.json and inside every saved model).

    With backbone encoders it also says which ("encoder", "backbone", "cbam",
    "encoder_weights", "encoder_nets", "encoder_frozen"); "encoder_nets" is
    [] for the paper's plain U-Nets.
    """
    lg = cfg.local_global
    encoder_info = encoders.info if encoders else {"encoder_nets": []}
    return {
        "task": "segment",
        "model": "local-global",
        "network": network,
        "lesion": cfg.lesion,
        "preprocessing": Preprocessing(method=cfg.preprocessing, centre_crop=centre_crop).to_dict(),
        "global_size": sizes.global_size,
        "patch_size": sizes.patch_size,
        "depths": sizes.depths,
        "base_filters": sizes.base_filters,
        "max_filters": sizes.max_filters,
        "fusion_filters": sizes.fusion_filters,
        "phases": list(lg.phases),
        "loss": "weighted-bce",
        "gamma": cfg.gamma,
        "lambdas": [lg.lambda_global, lg.lambda_local, lg.lambda_l2],
        "predict_tile": sizes.patch_size,
        "predict_overlap": cfg.predict_overlap,
        "predict_batch": cfg.predict_batch,
        "train_images": [r.name for r in train_records],
        "val_images": [r.name for r in val_records],
        **encoder_info,
    }


def train(cfg: SegmentConfig, train_records, val_records, run, resume: bool = False) -> dict:
    """Train the fused local-global U-Net of Yan et al. (ISBI 2019) in its phases.

    Runs the phases of `cfg.local_global.phases` in order, each one
    `rmib.training.fit` call in `run` (phase files, resumable), validating
    every `cfg.val_every` epochs on the held-out whole photographs as
    `rmib predict` would (`rmib.segment.WholeImageValidation`). The last
    phase writes `model.keras` with the run's metadata (task "segment",
    model "local-global", network, lesion, preprocessing, global_size,
    patch_size, depths, base_filters, encoder_nets ...), which `rmib.segmenters.load_segmenter`
    turns into a `LocalGlobalSegmenter`.

    Args:
        cfg: the segment configuration (`cfg.local_global` holds this method's settings).
        train_records, val_records: `Record`s annotated for `cfg.lesion`.
        run: the `rmib.training.RunDirectory`.
        resume: continue an interrupted run (finished phases are skipped).

    Returns:
        Validation metrics of the final model over the held-out whole
        photographs ("aupr" pooled and streaming, and the pixel metrics at
        0.5, as `rmib.segment.evaluate_examples`); {} without validation images.

    Raises:
        RmibError: no readable training image, sizes the U-Nets cannot take,
            a bad encoder (`encoder_setup`), a run directory that already
            holds a run without `resume`, and the errors of `rmib.training.fit`.
    """
    from rmib.segment import WholeImageValidation, evaluate_examples

    run = run if isinstance(run, training.RunDirectory) else training.RunDirectory(run)
    lg = cfg.local_global
    encoders = encoder_setup(cfg)
    sizes = resolve_sizes(cfg)
    cache = PreprocessedCache(cfg.cache_dir or None)
    problems: list = []
    train_photos = load_photographs(train_records, cfg, sizes.global_size, cache, problems)
    val_photos = load_photographs(val_records, cfg, sizes.global_size, cache, problems)
    if not train_photos.examples:
        raise RmibError("no training image could be read")
    centre_crop = train_photos.cropped > 0
    # Only the chief of a multi-worker run writes the run directory itself.
    chief = training.is_chief(training.get_strategy(cfg.train.strategy))
    if chief and not run.config_path.exists():
        run.write_config(cfg)

    trained: dict = {}
    model = None
    for index, phase in enumerate(lg.phases):
        later = lg.phases[index + 1 :]
        if resume and any(run.checkpoint_path("last", p).is_file() for p in later):
            continue  # finished, and a later phase already holds what it passed on
        network = NETWORK_OF_PHASE[phase]
        metadata = run_metadata(
            cfg, sizes, network, centre_crop, train_records, val_records, encoders
        )
        phase_cfg = phase_config(cfg, phase, validate=bool(val_photos.examples))
        steps = _steps(cfg, phase, len(train_photos.examples))
        start = _start_epoch(run, phase, resume)
        train_ds = _train_data(phase, train_photos, sizes, cfg, steps, start, phase_cfg.epochs)
        callbacks = []
        if val_photos.examples:
            callbacks.append(
                WholeImageValidation(
                    val_photos.examples,
                    lambda m, metadata=metadata: LocalGlobalSegmenter(m, metadata),
                    every=cfg.val_every,
                    epochs=phase_cfg.epochs,
                )
            )
        model, _ = training.fit(
            _phase_model_builder(phase, sizes, lg.lambda_l2, trained, encoders),
            train_ds,
            None,
            config=phase_cfg,
            run_dir=run,
            metadata=metadata,
            phase=phase,
            resume=resume,
            validation_callbacks=callbacks,
            steps_per_epoch=steps,
            save_final=phase == lg.phases[-1],
            **_compile_arguments(phase, cfg),
        )
        trained[phase] = model

    result = {}
    if val_photos.examples:
        metadata = run_metadata(
            cfg,
            sizes,
            NETWORK_OF_PHASE[lg.phases[-1]],
            centre_crop,
            train_records,
            val_records,
            encoders,
        )
        result = evaluate_examples(LocalGlobalSegmenter(model, metadata), val_photos.examples)
    if problems and chief:
        from rmib.predict import write_skipped

        write_skipped(run.path, problems)
    return result


__all__ = [
    "BoxPatchSampler",
    "EncoderSetup",
    "PHASES",
    "Photographs",
    "Sizes",
    "WeightedBCE",
    "augment_soft_pair",
    "combined_loss",
    "encoder_nets",
    "encoder_setup",
    "fused_dataset",
    "global_dataset",
    "kernels_of",
    "l2_penalty",
    "load_photographs",
    "phase_config",
    "resolve_sizes",
    "rotate_box",
    "rotate_fused_example",
    "run_metadata",
    "train",
]
