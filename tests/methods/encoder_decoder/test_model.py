"""Stage 2: the segmenter reuses the classifier's encoder, bit for bit, frozen."""

import keras
import numpy as np
import pytest

from rmib.methods.encoder_decoder.model import (
    build_encoder_decoder,
    required_multiple,
    set_encoder_trainable,
)
from rmib.models import build_backbone, build_classifier
from tests.helpers import run_model_checks
from tests.models.helpers import (
    assert_output,
    dtype_policy,
    fit_one_step,
    weights_by_path,
)

pytestmark = pytest.mark.timeout(600)

SIZE = 64
TAP_CHANNELS = {
    "vgg16": [512, 512, 512, 256, 128, 64],  # P5, then the skips P4 .. P0
    "resnet50": [2048, 1024, 512, 256, 64, 0],  # P5, then P4 .. P1, no skip at full res
}


def decoder_trainable_parameters(backbone, filters=(256, 128, 64, 32, 16)):
    """Hand count: per block a bias-free 1x1 projection and two bias-free 3x3 convs,
    each followed by a batch norm (gamma, beta trainable); then the 1x1 output conv."""
    channels, *skips = TAP_CHANNELS[backbone]
    total = 0
    for width, skip in zip(filters, skips, strict=True):
        block_in = channels + skip
        total += block_in * width + 2 * width  # projection + its bn
        total += 9 * block_in * width + 2 * width  # conv1 + bn1
        total += 9 * width * width + 2 * width  # conv2 + bn2
        channels = width
    return total + channels + 1


def _images(count=2, seed=0, size=SIZE):
    return np.random.default_rng(seed).uniform(0, 255, (count, size, size, 3)).astype("float32")


def _masks(images):
    return (images[..., :1] > 127).astype("float32")


@pytest.mark.parametrize(
    "backbone, cbam, eager", [("vgg16", True, False), ("resnet50", False, True)]
)
def test_segmenter_encoder_is_the_trained_classifier_encoder(backbone, cbam, eager):
    classifier = build_classifier(backbone, cbam=cbam, image_size=SIZE)
    initial = weights_by_path(classifier.get_layer("backbone"))
    x = _images()
    labels = np.array([[0.0], [1.0]], "float32")
    fit_one_step(classifier, x, labels, run_eagerly=True)
    if cbam:  # CBAM's hidden MLP moves once its zero-initialised output kernel has
        fit_one_step(classifier, x, labels, run_eagerly=True)
    trained = weights_by_path(classifier.get_layer("backbone"))
    changed = [path for path in trained if not np.array_equal(trained[path], initial[path])]
    kernels = [w.path for w in classifier.get_layer("backbone").trainable_weights if w.ndim >= 2]
    assert set(kernels) <= set(changed)  # (a dead ReLU unit's bias may stay put)

    segmenter = build_encoder_decoder(classifier.get_layer("backbone"))
    encoder = segmenter.get_layer("backbone")
    assert encoder is classifier.get_layer("backbone")
    assert weights_by_path(encoder).keys() == trained.keys()
    for path, value in weights_by_path(encoder).items():
        assert np.array_equal(value, trained[path]), path
    assert encoder.trainable_weights == []
    encoder_ids = {id(w) for w in encoder.weights}
    assert not any(id(w) in encoder_ids for w in segmenter.trainable_weights)
    trainable = sum(int(np.prod(w.shape)) for w in segmenter.trainable_weights)
    assert trainable == decoder_trainable_parameters(backbone)

    # Training the segmenter leaves the encoder untouched, batch-norm statistics included.
    fit_one_step(segmenter, x, _masks(x), run_eagerly=eager)
    for path, value in weights_by_path(encoder).items():
        assert np.array_equal(value, trained[path]), path


def test_output_shape_and_any_multiple_of_32(tmp_path):
    segmenter = build_encoder_decoder(build_backbone("vgg16", cbam=True))
    assert segmenter.name == "vgg16_cbam_encoder_decoder"
    assert required_multiple(segmenter) == 32
    probabilities = assert_output(segmenter, _images(), (2, SIZE, SIZE, 1), "float32")
    assert np.all((probabilities >= 0) & (probabilities <= 1))
    # Fully convolutional: a larger, non-square tile than the training patch.
    assert_output(segmenter, np.zeros((1, 128, 96, 3), "float32"), (1, 128, 96, 1), "float32")
    checks = run_model_checks(
        segmenter, _images(1, seed=3), tmp_path, output_shape=(1, SIZE, SIZE, 1)
    )
    loaded = checks.loaded
    assert sum(int(np.prod(w.shape)) for w in loaded.trainable_weights) == (
        decoder_trainable_parameters("vgg16")
    )


def test_from_name_under_mixed_bfloat16():
    with dtype_policy("mixed_bfloat16"):
        segmenter = build_encoder_decoder("resnet50", filters=(32, 16, 16, 8, 8))
        assert segmenter.name == "resnet50_encoder_decoder"
        assert segmenter.get_layer("decoder1_conv1").compute_dtype == "bfloat16"
        assert_output(segmenter, _images(1), (1, SIZE, SIZE, 1), "float32")
    trainable = sum(int(np.prod(w.shape)) for w in segmenter.trainable_weights)
    assert trainable == decoder_trainable_parameters("resnet50", (32, 16, 16, 8, 8))


def test_decoder_blocks_have_skips_and_residual_adds():
    segmenter = build_encoder_decoder("vgg16", filters=(8, 8, 8, 8, 8))
    encoder = segmenter.get_layer("backbone")
    for index, tap in enumerate(["P4", "P3", "P2", "P1", "P0"], start=1):
        concat = segmenter.get_layer(f"decoder{index}_concat")
        assert concat.input[1].shape[-1] == encoder.output[tap].shape[-1]
        add = segmenter.get_layer(f"decoder{index}_add")
        assert add.input[0] is segmenter.get_layer(f"decoder{index}_projection_bn").output
        assert add.input[1] is segmenter.get_layer(f"decoder{index}_relu2").output
    resnet = build_encoder_decoder("resnet50", filters=(8, 8, 8, 8, 8))
    names = {layer.name for layer in resnet.layers}
    assert "decoder4_concat" in names and "decoder5_concat" not in names
    assert required_multiple(resnet) == 32


def test_set_encoder_trainable_and_argument_checks():
    segmenter = build_encoder_decoder("vgg16", filters=(8, 8, 8, 8, 8))
    decoder_count = len(segmenter.trainable_weights)
    encoder = set_encoder_trainable(segmenter, True)
    assert len(segmenter.trainable_weights) == decoder_count + len(encoder.weights)
    set_encoder_trainable(segmenter, False)
    assert len(segmenter.trainable_weights) == decoder_count
    unfrozen = build_encoder_decoder("vgg16", filters=(8, 8, 8, 8, 8), freeze_encoder=False)
    assert unfrozen.get_layer("backbone").trainable
    classifier = build_classifier("vgg16", image_size=SIZE)
    assert required_multiple(classifier) == 32
    assert required_multiple(classifier.get_layer("backbone")) == 32
    with pytest.raises(ValueError, match="5 decoder widths"):
        build_encoder_decoder("vgg16", filters=(8, 8))
    with pytest.raises(ValueError, match="cbam"):
        build_encoder_decoder(build_backbone("vgg16"), cbam=True)
    assert isinstance(segmenter.get_layer("backbone"), keras.Model)
