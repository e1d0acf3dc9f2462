"""Data: VOC-layout trees (PASCAL VOC + SBD-aug, or the built-in benchmark) and few-shot episodes."""
