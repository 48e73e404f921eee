"""``python -m masked_ops.experiments NAME ...``: an entry point of the command line
(masked_ops.cli.experiment), kept beside the package it runs; nothing imports it."""
import sys

from ..cli.experiment import main

sys.exit(main())
