"""`python -m convert SRC OUT [--dtype bfloat16|float32] [--overwrite]`: the same command as
`jaxsparse convert` (arguments and error reporting in `jaxsparse.cli.convert`)."""

import sys

from jaxsparse.cli import run_command

sys.exit(run_command("convert", None, prog="python -m convert"))
