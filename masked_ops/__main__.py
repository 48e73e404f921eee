"""``python -m masked_ops`` (and ``torchrun ... -m masked_ops``): the ``masked-ops`` command, as
``python -m masked_ops.cli``."""
import sys

from .cli import main

sys.exit(main())
