"""``python -m eigenkv``: the command line (same as the ``eigenkv`` script)."""

import sys

from eigenkv.cli import main

sys.exit(main())
