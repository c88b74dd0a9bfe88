"""Data: prepared ``.beton`` files and the loaders that read them.

- ``manifest`` / ``format``: the JSON manifest and the binary layout of a ``.beton``, verification, a plain reader;
- ``writer`` / ``cache``: writing a split, and the cache of prepared splits that dataset plugins fill;
- ``loader`` / ``eval_loader``: the FFCV multi-view pretraining loader and the ordered evaluation loader;
- ``ops`` / ``augment`` / ``color_cpu``: seeded crop and flip inside FFCV, batched colour augmentation after it;
- ``ffcv_compat``: every workaround for FFCV 1.0.2 internals, and the one place FFCV is imported.
"""
