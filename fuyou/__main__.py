"""`python -m fuyou` is the `fuyou` command."""

import sys

from fuyou.cli import main

sys.exit(main())
