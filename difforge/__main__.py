"""`python -m difforge` is the `difforge` command."""

import sys

from difforge.cli import main

sys.exit(main())
