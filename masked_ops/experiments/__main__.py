"""``python -m masked_ops.experiments NAME ...``: see masked_ops.experiments.cli."""
import sys

from .cli import main

sys.exit(main())
