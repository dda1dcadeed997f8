"""The two-stage grader's export: both nets, the baseline, the whole pipeline (see `rmib.export`).

``grade_image`` runs Yang et al.'s pipeline (MICCAI 2017) inside the graph:
the local net over the grid of patches, the weighting matrix M in TensorFlow
ops (`lesion_map_graph`, the same maths as `rmib.methods.grading.lesion_map.weighted_lesion_map`),
I* = M / 4 * I resized as OpenCV does (`global_input_graph`), the global net.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import tensorflow as tf

from rmib.errors import RmibError
from rmib.export.archive import PREPROCESSING_METHODS, Exporter, probability, spec
from rmib.export.checks import Case, sample_photograph
from rmib.export.opencv_resize import opencv_area_resize, to_uint8
from rmib.methods.grading.grader import Grader
from rmib.methods.grading.grid import grid_positions
from rmib.methods.grading.lesion_map import MAX_WEIGHT, coverage_counts

DEFAULT_PATCH_BATCH = 64  # local-net patches per call in grade_image

GRADER_PREPROCESSING = (
    "grade_image takes the photograph after the whole preprocessing named in "
    "'preprocessing': its field-of-view mask; if fov_crop: the photograph cropped to the "
    "mask's bounding box; resized keeping the aspect ratio (OpenCV INTER_AREA) and padded "
    "with black, centred, to image_size x image_size; then "
    f"{PREPROCESSING_METHODS}; as uint8 RGB (see README 'Serving a SavedModel'). classify and "
    "classify_plain take the global net's input float32 in [0, 255], classify_patch the "
    "local net's patches float32 in [0, 255]."
)


def lesion_map_graph(local_fn, image, patch: int, overlap: int, batch_size: int):
    """`rmib.methods.grading.lesion_map.predict_lesion_map` in TensorFlow ops: the local net over the grid, then M.

    Args:
        local_fn: (B, patch, patch, 3) float32 -> (B, K) class probabilities.
        image: (S, S, 3) float32 tensor, S known.
        patch, overlap: the grid (`rmib.methods.grading.grid.grid_positions`).
        batch_size: patches per call of `local_fn`.

    Returns:
        (weights M (S, S) float32, labels (n, n) int32, probs (n, n) float32).
    """
    size = int(image.shape[0])
    positions = np.asarray(grid_positions(size, patch, overlap))
    n = len(positions)
    starts = np.stack(np.meshgrid(positions, positions, indexing="ij"), -1).reshape(-1, 2)
    offsets = np.arange(patch)
    rows = tf.constant(starts[:, :1] + offsets[None, :], tf.int32)  # (n * n, patch)
    cols = tf.constant(starts[:, 1:] + offsets[None, :], tf.int32)
    total = n * n
    batches = -(-total // batch_size)

    def body(i, scores):
        chunk = tf.range(i * batch_size, tf.minimum((i + 1) * batch_size, total))
        patches = tf.gather(image, tf.gather(rows, chunk), axis=0)  # (b, patch, S, 3)
        patches = tf.gather(patches, tf.gather(cols, chunk), axis=2, batch_dims=1)
        patches = tf.ensure_shape(patches, [None, patch, patch, image.shape[-1]])
        return i + 1, scores.write(i, tf.cast(local_fn(patches), tf.float32))

    _, scores = tf.while_loop(
        lambda i, _: i < batches,
        body,
        [tf.constant(0), tf.TensorArray(tf.float32, size=batches, infer_shape=False)],
        parallel_iterations=1,
        name="grid_patches",
    )
    scores = scores.concat()
    labels = tf.argmax(scores, axis=1, output_type=tf.int32)
    probs = tf.clip_by_value(tf.reduce_max(scores, axis=1), 0.0, 1.0)
    # weighted_lesion_map: (A LP A^T) / (count count^T), in float64 as NumPy does.
    weights = (tf.cast(labels, tf.float64) + 1.0) * tf.cast(probs, tf.float64)
    coverage = tf.constant(coverage_counts(size, patch, overlap), tf.float64)
    count = tf.reduce_sum(coverage, axis=1)
    grid = tf.reshape(weights, [n, n])
    total_map = tf.matmul(tf.matmul(coverage, grid), coverage, transpose_b=True)
    weights_map = tf.cast(total_map / (count[:, None] * count[None, :]), tf.float32)
    return weights_map, tf.reshape(labels, [n, n]), tf.reshape(probs, [n, n])


def global_input_graph(image, size: int, weights=None):
    """`rmib.methods.grading.lesion_map.global_input` in TensorFlow ops: I* = M / 4 * I (or I), resized, rounded."""
    array = tf.cast(image, tf.float32)
    if weights is not None:
        array = (weights[:, :, None] / MAX_WEIGHT) * array
    # Square to square: resize_pad neither pads nor keeps anything but the size.
    resized = opencv_area_resize(array, size, size)
    return tf.ensure_shape(tf.cast(to_uint8(resized), tf.float32), [size, size, 3])


def _grades(net, images):
    probabilities = probability(net, images)
    return {
        "probabilities": probabilities,
        "grade": tf.argmax(probabilities, axis=-1, output_type=tf.int32),
    }


class GraderExporter(Exporter):
    """`rmib grade train`'s run: ``classify``, ``classify_patch``, ``grade_image``
    (and ``classify_plain`` with the baseline); the model is the run's `rmib.methods.grading.grader.Grader`."""

    kind = "grader"
    batch_signature = "classify"
    description = "a grader"

    def refuse(self, model_path, format):
        if not Path(model_path).is_dir():
            raise RmibError(
                f"{model_path}: one network of a grading run; rmib export takes the run "
                "directory of `rmib grade train` (it exports both networks together)"
            )
        if format == "keras":
            raise RmibError(
                f"{model_path}: a grading run has two networks (local_net.keras, "
                "global_net.keras); --format keras copies one model file: copy them from the "
                "run directory, or export a SavedModel"
            )

    def load(self, model_path, unsafe):
        grader = Grader.load(model_path, unsafe=unsafe)
        self.networks(grader)  # load every network now: fail before writing
        return grader

    def networks(self, model):
        nets = [model.local_net, model.global_net]
        return nets + [model.plain_net] if model.metadata.get("baseline") else nets

    def metadata(self, run_metadata, preprocessing, tiling):
        size, patch = int(run_metadata["image_size"]), int(run_metadata["patch_size"])
        grid_overlap = int(run_metadata["overlap"])
        return {
            "model": run_metadata.get("model"),
            "image_size": size,
            "patch_size": patch,
            "overlap": grid_overlap,
            "grid_positions": grid_positions(size, patch, grid_overlap),
            "grades": int(run_metadata["grades"]),
            "grade_names": run_metadata.get("grade_names"),
            "patch_classes": run_metadata.get("patch_classes"),
            "global_size": int(run_metadata["global_size"]),
            "global_net": run_metadata.get("global_net"),
            "baseline": bool(run_metadata.get("baseline")),
            "patch_batch": DEFAULT_PATCH_BATCH,
            "lesion_map": {
                "weights": "M = mean over the covering grid patches of (label + 1) * probability",
                "global_input": "rint(clip(INTER_AREA resize of M / 4 * I to global_size))",
            },
        }

    def caller_preprocessing(self, preprocessing):
        return GRADER_PREPROCESSING

    def signature_docs(self, meta):
        size, patch, side = meta.get("image_size"), meta.get("patch_size"), meta.get("global_size")
        n, grades = len(meta.get("grid_positions") or []) or "n", meta.get("grades") or "K"
        grade_outputs = {
            "probabilities": spec("float32", [None, grades], "softmax over the DR grades"),
            "grade": spec("int32", [None], "the most probable grade"),
        }
        weighted = spec(
            "float32",
            [None, side, side, 3],
            "the global net's input in [0, 255]: I* = M / 4 * I resized to global_size "
            "(with OpenCV INTER_AREA) and rounded to whole numbers",
        )
        patches = spec(
            "float32", [None, patch, patch, 3], "patches of the preprocessed photograph in [0, 255]"
        )
        patch_outputs = {
            "probabilities": spec(
                "float32",
                [None, len(meta.get("patch_classes") or []) or 4],
                "softmax over patch_classes (normal, MA, HE, EX)",
            ),
            "label": spec("int32", [None], "the most probable patch class"),
        }
        image = spec(
            "uint8",
            [size, size, 3],
            "one photograph after the whole preprocessing (see caller_preprocessing)",
        )
        image_outputs = {
            "probabilities": spec(
                "float32", [grades], "the global net's softmax over the DR grades"
            ),
            "grade": spec("int32", [], "the most probable grade"),
            "weights": spec(
                "float32",
                [size, size],
                "the weighting matrix M in [0, 4]: per pixel, the mean of "
                "(label + 1) * probability over the grid patches covering it",
            ),
            "labels": spec("int32", [n, n], "the local net's label of each grid patch (row-major)"),
            "patch_probabilities": spec(
                "float32", [n, n], "the local net's largest probability of each patch"
            ),
        }
        docs = {
            "classify": {"inputs": {"images": weighted}, "outputs": grade_outputs},
            "classify_patch": {"inputs": {"patches": patches}, "outputs": patch_outputs},
            "grade_image": {"inputs": {"image": image}, "outputs": image_outputs},
        }
        if meta.get("baseline"):
            plain = spec(
                "float32",
                [None, side, side, 3],
                "the preprocessed photograph itself resized to global_size "
                "(INTER_AREA) and rounded: the non-weighted baseline's input",
            )
            docs["classify_plain"] = {"inputs": {"images": plain}, "outputs": dict(grade_outputs)}
            image_outputs["plain_probabilities"] = spec(
                "float32", [grades], "the non-weighted baseline's softmax over the grades"
            )
            image_outputs["plain_grade"] = spec("int32", [], "the baseline's most probable grade")
        return docs

    def add_endpoints(self, archive, grader, metadata, patch_size=None):
        size, patch, overlap = metadata["image_size"], metadata["patch_size"], metadata["overlap"]
        side, batch_size = metadata["global_size"], metadata["patch_batch"]
        local_net, global_net = grader.local_net, grader.global_net
        plain_net = grader.plain_net if metadata.get("baseline") else None
        global_spec = tf.TensorSpec((None, side, side, 3), tf.float32, name="images")

        archive.add_endpoint(
            "classify", lambda images: _grades(global_net, images), input_signature=[global_spec]
        )

        def classify_patch(patches):
            probabilities = probability(local_net, patches)
            return {
                "probabilities": probabilities,
                "label": tf.argmax(probabilities, axis=-1, output_type=tf.int32),
            }

        archive.add_endpoint(
            "classify_patch",
            classify_patch,
            input_signature=[tf.TensorSpec((None, patch, patch, 3), tf.float32, name="patches")],
        )
        names = ["classify", "classify_patch"]

        def grade_image(image):
            image = tf.cast(image, tf.float32)
            weights, labels, probs = lesion_map_graph(
                lambda patches: probability(local_net, patches), image, patch, overlap, batch_size
            )
            weighted = global_input_graph(image, side, weights)
            out = _grades(global_net, weighted[None])
            result = {
                "probabilities": out["probabilities"][0],
                "grade": out["grade"][0],
                "weights": weights,
                "labels": labels,
                "patch_probabilities": probs,
            }
            if plain_net is not None:
                plain = _grades(plain_net, global_input_graph(image, side)[None])
                result.update(
                    plain_probabilities=plain["probabilities"][0], plain_grade=plain["grade"][0]
                )
            return result

        archive.add_endpoint(
            "grade_image",
            grade_image,
            input_signature=[tf.TensorSpec((size, size, 3), tf.uint8, name="image")],
        )
        names.append("grade_image")
        if plain_net is not None:
            archive.add_endpoint(
                "classify_plain",
                lambda images: _grades(plain_net, images),
                input_signature=[global_spec],
            )
            names.append("classify_plain")
        return names

    def batch_cases(self, grader, metadata, patch_size=None, seed=0):
        rng = np.random.default_rng(seed)
        side, patch = metadata["global_size"], metadata["patch_size"]
        nets = {"classify": grader.global_net}
        if metadata.get("baseline"):
            nets["classify_plain"] = grader.plain_net
        cases = []
        for name, net in nets.items():
            images = rng.uniform(0, 255, (2, side, side, 3)).astype(np.float32)
            expected = {"probabilities": probability(net, images)}
            cases.append(Case(name, {"images": images}, expected))
        patches = rng.uniform(0, 255, (3, patch, patch, 3)).astype(np.float32)
        expected = {"probabilities": probability(grader.local_net, patches)}
        return [*cases, Case("classify_patch", {"patches": patches}, expected)]

    def image_case(self, grader, metadata):
        side = metadata["image_size"] * 5 // 4
        image, _ = sample_photograph(metadata["preprocessing"], (side + 7, side + 20))
        result = grader.grade_prepared(image)
        expected = {
            "probabilities": result.probs,
            "weights": result.lesion_map.weights,
            "grade": result.grade,
        }
        argmax = {"grade": "probabilities"}
        if metadata.get("baseline"):
            expected.update(plain_probabilities=result.plain_probs, plain_grade=result.plain_grade)
            argmax["plain_grade"] = "plain_probabilities"
        return Case("grade_image", {"image": image}, expected, argmax=argmax)


def export(run_metadata: dict) -> GraderExporter:
    """The exporter of a `rmib grade train` run (the grading row's `rmib.tasks.Method.export`)."""
    return GraderExporter()
