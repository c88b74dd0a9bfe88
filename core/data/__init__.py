"""Data: the `.beton` format and its manifest, the writer, the prepared-dataset cache, the FFCV multi-view loader and its numba ops, and batched colour augmentation."""
