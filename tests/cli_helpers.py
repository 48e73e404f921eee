"""What the command-line tests share: running the CLI, the PNGs it left (the ``photo`` fixture: conftest.py)."""
import os

from masked_ops import cli


def run_cli(argv, capsys):
    """(exit status, stdout, stderr) of ``masked-ops ARGV``."""
    code = cli.main(argv)
    out = capsys.readouterr()
    return code, out.out, out.err


def pngs(folder):
    """The PNGs in ``folder`` other than the input photo (a failed run must leave none)."""
    return sorted(f for f in os.listdir(folder) if f.endswith(".png") and f != "photo.png")
