"""``python -m nodeprune_kernels`` is the ``nodeprune`` command line (see cli.py)."""
import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
