"""rmib's Keras models: backbones with skip taps, the stage-1 classifier, the segmenters."""

from rmib.models.backbones import BACKBONES, backbone_name, build_backbone
from rmib.models.classifier import build_classifier
from rmib.models.dual2net import Dual2Net, Dual2NetSegmenter, build_dual2net
from rmib.models.encoder_decoder import (
    build_encoder_decoder,
    find_encoder,
    required_multiple,
    set_encoder_trainable,
)
from rmib.models.layers import CBAM, FusedBatchNormalization, ImageNetPreprocessing
from rmib.models.local_global import (
    GlobalFeatureCrop,
    LocalGlobalSegmenter,
    build_local_global,
)
from rmib.models.unet import build_encoder_unet_trunk, build_unet, build_unet_trunk

__all__ = [
    "Dual2Net",
    "Dual2NetSegmenter",
    "build_dual2net",
    "BACKBONES",
    "CBAM",
    "FusedBatchNormalization",
    "GlobalFeatureCrop",
    "ImageNetPreprocessing",
    "LocalGlobalSegmenter",
    "backbone_name",
    "build_backbone",
    "build_classifier",
    "build_encoder_decoder",
    "build_encoder_unet_trunk",
    "build_local_global",
    "build_unet",
    "build_unet_trunk",
    "find_encoder",
    "required_multiple",
    "set_encoder_trainable",
]
