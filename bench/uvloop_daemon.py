"""`python -m mailcloak` on uvloop's event loop, for measuring it side by side (bench/run.py --uvloop)."""

import asyncio
import sys

import uvloop

from mailcloak.daemon import main

if __name__ == "__main__":
    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    sys.exit(main())
