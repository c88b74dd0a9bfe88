"""Shared test set-up. Prepared datasets are cached once per session in a temporary data directory (never in
the user's ~/.cache), and torch uses one thread so parallel workers do not oversubscribe the 2-core CI box."""

from __future__ import annotations

import os
import tempfile

import pytest
import torch

# Set before any DataCfg is built: DataCfg.data_dir defaults to $SSLRUN_DATA_DIR.
_SESSION_DATA_DIR = tempfile.mkdtemp(prefix="sslrun-test-data-")
os.environ["SSLRUN_DATA_DIR"] = _SESSION_DATA_DIR
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
torch.set_num_threads(1)

FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"


@pytest.fixture(scope="session")
def session_data_dir() -> str:
    """The per-session cache of prepared .beton files (shared by all tests)."""
    return _SESSION_DATA_DIR


@pytest.fixture(scope="session")
def fashion_mnist_dir() -> str:
    """The real Fashion-MNIST IDX files from Debian's dataset-fashion-mnist (installed by `make`)."""
    if not os.path.isdir(FASHION_MNIST_DIR):
        pytest.fail(f"{FASHION_MNIST_DIR} is missing: install Debian's dataset-fashion-mnist (make setup does)")
    return FASHION_MNIST_DIR
