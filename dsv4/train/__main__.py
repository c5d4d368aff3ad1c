"""`python -m dsv4.train ...`: the same as `dsv4 train ...`."""

import sys

from .cli import main

sys.exit(main())
