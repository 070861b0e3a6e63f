"""`python -m care`: the same as the `care` command."""

import sys

from care.cli import main

if __name__ == "__main__":
    sys.exit(main())
