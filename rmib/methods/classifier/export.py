"""The stage-1 classifier's export: ``classify(images)`` (see `rmib.export`)."""

from __future__ import annotations

import numpy as np
import tensorflow as tf

from rmib.export.archive import DEFAULT_THRESHOLD, Exporter, probability, spec
from rmib.export.checks import Case


class ClassifierExporter(Exporter):
    """``classify``: a batch of preprocessed photographs -> the probability of a lesion."""

    kind = "classifier"
    batch_signature = "classify"
    description = "a classifier"

    def metadata(self, run_metadata, preprocessing, tiling):
        return {
            "threshold": float(run_metadata.get("threshold", DEFAULT_THRESHOLD)),
            "image_size": preprocessing.get("size") or run_metadata.get("image_size"),
        }

    def signature_docs(self, metadata):
        images = spec(
            "float32", [None, "S", "S", 3], "preprocessed RGB photographs in [0, 255], S = size"
        )
        outputs = {
            "probability": spec(
                "float32", [None, 1], "probability that the photograph shows a lesion"
            )
        }
        return {"classify": {"inputs": {"images": images}, "outputs": outputs}}

    def add_endpoints(self, archive, model, metadata, patch_size=None):
        size = metadata.get("image_size")

        def classify(images):
            return {"probability": probability(model, images)}

        archive.add_endpoint(
            "classify",
            classify,
            input_signature=[tf.TensorSpec((None, size, size, 3), tf.float32, name="images")],
        )
        return ["classify"]

    def batch_cases(self, model, metadata, patch_size=None, seed=0):
        size = metadata["image_size"]
        images = np.random.default_rng(seed).uniform(0, 255, (2, size, size, 3))
        images = images.astype(np.float32)
        return [Case("classify", {"images": images}, {"probability": probability(model, images)})]


def export(run_metadata: dict) -> ClassifierExporter:
    """The exporter of a `rmib pretrain` run (`rmib.tasks.Method.export`)."""
    return ClassifierExporter()
