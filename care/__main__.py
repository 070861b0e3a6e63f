"""`python -m care ...` (also what `accelerate launch -m care train ...` runs on every process)."""

import sys

from care.cli import main

sys.exit(main())
