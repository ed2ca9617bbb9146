"""Calibration: block discovery, the block-by-block pipeline, layer targets and the observers
(input ranges, Hessians) that quantization and pruning methods share."""
