"""The patch-grid DR grader of Yang et al. (MICCAI 2017) (`rmib grade`).

"Lesion detection and grading of diabetic retinopathy via two-stage deep
convolutional neural networks": a local network labels the patches of an
overlapping grid (normal, MA, haemorrhage, exudate); the labels and their
probabilities form a weighting matrix M; a global network grades the weighted
lesion map I* = (M / 4) * I. Modules: config, grid, patches, nets,
lesion_map, data, train (`train_grader`), grader (`Grader`), evaluate, export.
"""
