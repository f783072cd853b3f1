"""Put on PYTHONPATH, this makes kqfast.Loop the loop that asyncio.new_event_loop(),
asyncio.run() and asyncio.Runner() create (the default policy's loop factory), so CPython's own
test_asyncio runs on kqfast's loop (tests/asyncio_oracle/run.py)."""
from asyncio import unix_events

import kqfast

unix_events._UnixDefaultEventLoopPolicy._loop_factory = kqfast.Loop
