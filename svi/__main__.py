"""``python -m svi`` is the ``svi`` command (torchrun launches it this way)."""

import sys

from svi.cli import main

sys.exit(main())
