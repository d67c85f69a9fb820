"""`python -m boomerang.cli ...`: the `boomerang` command."""

import sys

from boomerang.cli import main

sys.exit(main())
