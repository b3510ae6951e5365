"""`python -m fastbond …` (also what `deepspeed -m fastbond …` runs)."""

import sys

from fastbond.cli import main

sys.exit(main())
