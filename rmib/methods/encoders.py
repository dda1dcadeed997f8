"""The encoder every segmenter can start from: a stage-1 run (the RMIB transfer) or a backbone."""

from __future__ import annotations

from pathlib import Path

from rmib import training
from rmib.errors import RmibError
from rmib.methods.segment_config import SegmentConfig


def _is_run(path) -> bool:
    path = Path(path)
    return path.is_dir() or path.suffix == ".keras"


def encoder_factory(cfg: SegmentConfig):
    """(function building the encoder inside the strategy scope, metadata, frozen?)."""
    if _is_run(cfg.encoder):
        source = Path(cfg.encoder)
        if not source.exists():
            raise RmibError(f"--encoder {source}: no such run directory or .keras file")
        meta = training.read_run_metadata(source)
        if meta.get("task") not in (None, "pretrain"):
            raise RmibError(
                f"--encoder {source}: a {meta.get('task')!r} run, expected a `rmib pretrain` run"
            )

        def build():
            classifier = _load_in_current_precision(source)
            try:
                return classifier.get_layer("backbone")
            except ValueError:
                raise RmibError(
                    f"--encoder {source}: the model has no 'backbone' layer; "
                    "expected a classifier trained by `rmib pretrain`"
                ) from None

        info = {
            "encoder": str(source),
            "backbone": meta.get("backbone"),
            "cbam": meta.get("cbam"),
            "encoder_weights": "stage-1",
        }
        frozen = cfg.freeze_encoder != "no"
        return build, info, frozen
    from rmib.models import BACKBONES, build_backbone

    if cfg.encoder not in BACKBONES:
        raise RmibError(
            f"--encoder {cfg.encoder!r}: not a run directory, a .keras file or a backbone "
            f"(valid backbones: {', '.join(BACKBONES)})"
        )
    weights = None if cfg.weights in ("", "none") else cfg.weights

    def build():
        return build_backbone(cfg.encoder, cbam=cfg.cbam, weights=weights, model_name="backbone")

    frozen = cfg.freeze_encoder == "yes" or (cfg.freeze_encoder == "auto" and weights is not None)
    info = {
        "encoder": cfg.encoder,
        "backbone": cfg.encoder,
        "cbam": cfg.cbam,
        "encoder_weights": cfg.weights,
    }
    return build, info, frozen


def _load_in_current_precision(source):
    """The stage-1 classifier at `source`, computing in the global dtype policy.

    Keras restores every layer with the policy it was saved with, so a stage-1 run
    trained in float32 would keep the transferred encoder (most of a segmenter's
    compute) in float32 under `--precision auto` on a bfloat16 CPU or a GPU. Loaded
    in float32, then switched as `rmib predict --precision` switches a model
    (`with_precision`: the classifier's output layer stays float32); the weights
    are float32 under every policy, so none changes.
    """
    import keras

    from rmib.training.devices import SIGNIFICAND_BITS, with_precision

    precision = keras.mixed_precision.global_policy().name
    keras.mixed_precision.set_global_policy("float32")
    try:
        classifier = training.load_model(source)
    finally:
        keras.mixed_precision.set_global_policy(precision)
    if precision in SIGNIFICAND_BITS:
        with_precision(classifier, precision)
    return classifier


def check_encoder(cfg: SegmentConfig) -> None:
    """Refuse an `encoder` or `weights` the run could not use, before any data is read.

    A stage-1 run must exist and be a `rmib pretrain` run; a backbone name must
    be known and its `weights` loadable (`rmib.models.backbones.check_weights`).
    Nothing is built or loaded.

    Raises:
        RmibError: naming the encoder or weights and what was expected.
    """
    encoder_factory(cfg)
    if not _is_run(cfg.encoder):
        from rmib.models.backbones import check_weights

        check_weights(cfg.encoder, cfg.weights)


def describe_encoder(cfg: SegmentConfig) -> str:
    """One line saying what the encoder-decoder's encoder is built from, and whether it trains.

    `rmib segment` prints it first, so a run without `--encoder` cannot be
    mistaken for the transferred stage-1 encoder: that default is VGG16 from
    scratch.
    """
    if _is_run(cfg.encoder):
        frozen = "frozen" if cfg.freeze_encoder != "no" else "trainable"
        return f"encoder: the stage-1 classifier of {cfg.encoder}, transferred, {frozen}"
    name = cfg.encoder + ("+CBAM" if cfg.cbam else "")
    if cfg.weights in ("", "none"):
        trainable = "frozen" if cfg.freeze_encoder == "yes" else "trainable"
        return (
            f"encoder: {name} from scratch (random init, {trainable}; "
            "pass --encoder RUN to transfer a stage-1 classifier)"
        )
    frozen = "trainable" if cfg.freeze_encoder == "no" else "frozen"
    return f"encoder: {name} with {cfg.weights} weights, {frozen}"
