"""``python -m nimbus.cli``: the same as the ``nimbus`` command."""

import sys

from nimbus.cli import main

sys.exit(main())
