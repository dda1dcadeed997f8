"""RMIB stage 2: a stage-1 classifier's frozen feature extractor as the encoder of an encoder-decoder."""
