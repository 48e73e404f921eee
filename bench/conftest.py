"""Shared set-up of the op benchmarks: two threads (the CI machine), seeded inputs, paper masks."""
import os
import sys

import pytest
import torch

# The benchmarks reuse the tests' mask generator (tests/op_cases.py).
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))


@pytest.fixture(autouse=True)
def _two_threads():
    previous = torch.get_num_threads()
    torch.set_num_threads(2)
    torch.manual_seed(0)
    yield
    torch.set_num_threads(previous)


def pytest_collect_file(file_path, parent):
    """Collect bench_*.py under `pytest bench` (the project's python_files only matches test_*.py).

    Files named on the command line are collected by pytest itself, so skip those here.
    """
    if file_path.suffix == ".py" and file_path.name.startswith("bench_") and not parent.session.isinitpath(file_path):
        return pytest.Module.from_parent(parent, path=file_path)
    return None
