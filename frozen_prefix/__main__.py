"""`python -m frozen_prefix COMMAND ...`: the same as the `frozen-prefix` command."""

import sys

from .commands import main

if __name__ == "__main__":
    sys.exit(main())
