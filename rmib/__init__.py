"""rmib: transfer learning for retinal fundus images (Keras 3 / TensorFlow).

Stage 1 trains a "lesion / healthy" classifier; stage 2 reuses its frozen
feature extractor as the encoder of per-lesion segmenters. Around that idea
rmib carries Keras ports of the fused local-global U-Net (Yan et al. 2019),
Dual2Net with the DSM Dice loss, and the patch-grid DR grader (Yang et al. 2017).
"""

from rmib.registration import install_when_keras_is_imported

__version__ = "0.1.0"

from rmib.choices import LESIONS as LESIONS

LESION_NAMES = {
    "EX": "hard exudates",
    "HE": "haemorrhages",
    "MA": "microaneurysms",
    "SE": "soft exudates",
    "OD": "optic disc",
}

# The public entry points, imported on first use (PEP 562) so that `import rmib`
# and `rmib --help` do not pay for TensorFlow: `from rmib import run_segment`.
_PUBLIC = (
    "METHODS",
    "GradeConfig",
    "PretrainConfig",
    "SegmentConfig",
    "export_model",
    "load_grader",
    "load_segmenter",
    "make_segmenter",
    "run_pretrain",
    "run_segment",
    "train_grader",
)


# `keras.models.load_model` opens every .keras file rmib wrote once `rmib` is
# imported: its custom objects register on Keras' first look-up of one.
install_when_keras_is_imported()


def __getattr__(name):
    if name in _PUBLIC:
        from rmib import tasks

        return getattr(tasks, name)
    raise AttributeError(f"module 'rmib' has no attribute {name!r}")


def __dir__():
    return sorted(list(globals()) + list(_PUBLIC))
