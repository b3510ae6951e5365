"""`python -m fastbond …` (also what `deepspeed --module fastbond …` runs)."""

import sys

from fastbond.cli import main

sys.exit(main())
