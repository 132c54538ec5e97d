"""``python -m craftfn train|eval ...`` (the same as the ``craftfn`` command)."""

import sys

from craftfn.cli import main

sys.exit(main())
