"""The local-global U-Net's sizes, depths, encoders and per-phase training settings, resolved from a SegmentConfig."""

from __future__ import annotations

import dataclasses

from rmib.errors import RmibError
from rmib.methods.local_global.model import (
    BACKBONE_MAX_DEPTH,
    default_depths,
)
from rmib.methods.segment_config import LOCAL_GLOBAL_PHASES, SegmentConfig

PHASES = LOCAL_GLOBAL_PHASES
NETWORK_OF_PHASE = {"global": "global", "local": "local", "fusion": "fused", "joint": "fused"}
ENCODER_DECODER_PATCH = 160  # SegmentConfig's default patch, the RMIB paper's
PAPER_PATCH = 256  # LocalNet's patch in Yan et al.
PAPER_LEARNING_RATE = 2e-4  # GlobalNet and LocalNet, Adam with polynomial decay


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
    from rmib.methods.encoders import _is_run

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

    Checks the stage-1 run without loading it (`rmib.methods.encoders.encoder_factory`).

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
    from rmib.methods.encoders import encoder_factory

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
