"""``python -m apicsim``: the same as the ``apicsim`` console script."""

import sys

from apicsim.cli import main

sys.exit(main())
