"""``python -m masked_ops.cli`` (and ``torchrun ... -m masked_ops.cli``): the ``masked-ops`` command."""
import sys

from . import main

sys.exit(main())
