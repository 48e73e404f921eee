"""Shared pytest fixtures (kept small: other test modules and helpers import from tests/)."""
import os
import sys

import pytest
import torch

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
