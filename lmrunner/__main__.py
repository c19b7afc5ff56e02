"""``python -m lmrunner``."""

import sys

from lmrunner.cli import main

sys.exit(main())
