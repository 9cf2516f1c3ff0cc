"""``python -m lifecycle``: the same as the ``lifecycle`` command."""

import sys

from ._cli import main

sys.exit(main())
