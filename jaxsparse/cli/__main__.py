"""`python -m jaxsparse.cli`: the `jaxsparse` command without the console script."""

import sys

from jaxsparse.cli import main

sys.exit(main())
