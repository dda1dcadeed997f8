"""Training methods of the published segmenters `rmib segment --model ...` hands off to.

Each module has `train(cfg, train_records, val_records, run, resume=False) -> dict`.
"""
