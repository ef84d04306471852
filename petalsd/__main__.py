"""`python -m petalsd` is the same as the `petalsd` command."""
import sys

from .cli import main

sys.exit(main())
