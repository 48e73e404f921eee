"""Shared pytest fixtures (kept small: other test modules and helpers import from tests/)."""
import os
import sys

import numpy as np
import pytest
import torch
from PIL import Image

# Make `from op_cases import ...` work for every test module, whatever the rootdir.
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(autouse=True)
def _seed_and_threads():
    """Every test starts from the same RNG state; two threads, as on the CI machine."""
    torch.manual_seed(0)
    previous = torch.get_num_threads()
    torch.set_num_threads(min(previous, 2))
    yield
    torch.set_num_threads(previous)


@pytest.fixture
def photo(tmp_path):
    """(command-line tests) A 56 x 40 random RGB PNG (the CLI resizes and centre-crops it to the model's input)."""
    rgb = (np.random.RandomState(0).rand(40, 56, 3) * 255).astype(np.uint8)
    path = tmp_path / "photo.png"
    Image.fromarray(rgb).save(path)
    return str(path)
