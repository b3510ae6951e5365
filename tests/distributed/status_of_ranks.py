"""`fastbond` as `deepspeed --module fastbond` runs it, each rank writing its exit status first.

The launcher exits with the first non-zero status it sees and stops the other ranks, so it cannot
say whether every rank chose the same one; this records them in $FASTBOND_TEST_STATUS/rank<N>.
"""

import os
import sys
from pathlib import Path

from fastbond.cli import main

status = main()
Path(os.environ["FASTBOND_TEST_STATUS"], f"rank{os.environ['RANK']}").write_text(str(status))
sys.exit(status)
