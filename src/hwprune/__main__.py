"""``python -m hwprune``: the command line, also as ``torchrun ... -m hwprune run RECIPE``."""

import sys

from .app.cli import main

if __name__ == "__main__":
    sys.exit(main())
