"""Entry point of `python -m int4train.train` (the command line lives in cli.py)."""

import sys

from .cli import main

sys.exit(main())
