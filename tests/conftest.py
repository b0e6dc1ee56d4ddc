"""Shared fixtures: one tiny av-digits dataset for the whole session (generated once, ~5 s)."""
from __future__ import annotations

import pytest
import torch

from pdmp_cli.config import DataConfig
from pdmp_cli.data import load_dataset

TINY_SAMPLES = 200

torch.set_num_threads(2)


@pytest.fixture(scope="session")
def data_root(tmp_path_factory):
    return tmp_path_factory.mktemp("datasets")


@pytest.fixture(scope="session")
def tiny_data_config(data_root) -> DataConfig:
    return DataConfig(samples=TINY_SAMPLES, root=str(data_root))


@pytest.fixture(scope="session")
def tiny(tiny_data_config):
    return load_dataset(tiny_data_config, quiet=True)
