"""``python -m Speckle2SelfLib.cli``: the same as the ``speckle2self`` command."""

import sys

from .main import main

sys.exit(main())
