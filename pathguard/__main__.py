"""``python -m pathguard``: the same as the ``pathguard`` console script."""

import sys

from .main import main

sys.exit(main())
