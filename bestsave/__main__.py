"""``python -m bestsave``: the ``bestsave`` command (see :mod:`bestsave.cli`)."""

import sys

from bestsave.cli import main

sys.exit(main())
