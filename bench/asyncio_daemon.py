"""`python -m mailcloak` on asyncio's own event loop even where uvloop is installed, for measuring
both side by side (bench/run.py --uvloop)."""

import sys

sys.modules["uvloop"] = None  # the daemon then finds no uvloop to use

from mailcloak.daemon import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
