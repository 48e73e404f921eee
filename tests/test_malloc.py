"""keep_freed_memory: glibc's malloc told to keep freed tensor memory (masked_ops/_util/malloc.py).

Its speed is measured in bench/bench_malloc.py, not here. These tests check that the settings are made
where they apply, refused cleanly where they do not, and that the masked-ops command makes them (unless
the environment opts out) while importing the library does not.
"""
import subprocess
import sys

import pytest

import masked_ops as mo
from masked_ops._util import malloc


@pytest.fixture
def fresh(monkeypatch):
    monkeypatch.setattr(malloc, "_applied", False)


class FakeLibc:
    def __init__(self, accept=True):
        self.calls = []
        self.accept = accept

    def mallopt(self, param, value):
        self.calls.append((param, value))
        return 1 if self.accept else 0


def test_both_thresholds_are_set(fresh, monkeypatch):
    libc = FakeLibc()
    monkeypatch.setattr(malloc, "_glibc", lambda: libc)
    assert mo.keep_freed_memory() is True
    assert libc.calls == [(malloc.M_MMAP_THRESHOLD, 32 * 1024 * 1024), (malloc.M_TRIM_THRESHOLD, 1 << 30)]
    assert mo.keep_freed_memory() is True and len(libc.calls) == 2  # idempotent: set once


def test_refused_settings_report_false(fresh, monkeypatch):
    monkeypatch.setattr(malloc, "_glibc", lambda: FakeLibc(accept=False))
    assert mo.keep_freed_memory() is False
    assert malloc._applied is False


def test_without_glibc_nothing_happens(fresh, monkeypatch):
    monkeypatch.setattr(malloc, "_glibc", lambda: None)
    assert mo.keep_freed_memory() is False


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt: Linux only")
def test_glibc_accepts_the_settings(fresh):
    """The real mallopt takes both values (an mmap threshold above 32 MiB would be refused)."""
    if malloc._glibc() is None:
        pytest.skip("not glibc")
    code = "import masked_ops as mo; print(mo.keep_freed_memory())"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "True"


def test_importing_the_library_changes_nothing():
    code = "import masked_ops, masked_ops.explain; from masked_ops._util import malloc; print(malloc._applied)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"


@pytest.mark.parametrize("env,expected", [(None, True), ("1", True), ("0", False), ("off", False)])
def test_the_command_keeps_freed_memory_unless_opted_out(env, expected, fresh, monkeypatch):
    from masked_ops.cli import main

    calls = []
    monkeypatch.setattr(malloc, "keep_freed_memory", lambda: calls.append(1) or True)
    if env is None:
        monkeypatch.delenv(malloc.ENV, raising=False)
    else:
        monkeypatch.setenv(malloc.ENV, env)
    assert main([]) == 2  # no command: an error, after the settings
    assert (calls == [1]) is expected
