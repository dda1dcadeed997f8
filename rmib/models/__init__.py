"""rmib's shared Keras building blocks: CBAM and other layers, backbones with skip taps,
U-Net trunks and the stage-1 classifier. Each method's own model is in
`rmib.methods.<method>.model`."""

from rmib.models.backbones import BACKBONES, backbone_name, build_backbone
from rmib.models.classifier import build_classifier
from rmib.models.layers import CBAM, FusedBatchNormalization, ImageNetPreprocessing
from rmib.models.unet import build_encoder_unet_trunk, build_unet, build_unet_trunk

__all__ = [
    "BACKBONES",
    "CBAM",
    "FusedBatchNormalization",
    "ImageNetPreprocessing",
    "backbone_name",
    "build_backbone",
    "build_classifier",
    "build_encoder_unet_trunk",
    "build_unet",
    "build_unet_trunk",
]
