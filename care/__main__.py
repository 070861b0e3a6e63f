"""`python -m care ...`: the `care` command (also what `accelerate launch -m care train ...` runs on every process)."""

import sys

from care.cli import main

if __name__ == "__main__":
    sys.exit(main())
