"""The asyncio event loops the Python servers can run on, by name: the standard library's,
uvloop's, rloop's and kqfast's own (kqfast.new_event_loop).  bench/field.py asks
`missing(name)` before it lists a server; the servers call `run(main, name)`."""
from __future__ import annotations

import asyncio
import sys
from importlib import import_module

LOOPS = ("asyncio", "uvloop", "rloop", "kqfast")
# name -> (module, attribute of the loop factory, how to get the module)
FACTORIES = {
    "asyncio": ("asyncio", "new_event_loop", "the standard library"),
    "uvloop": ("uvloop", "new_event_loop", "pip install uvloop (in kqfast[bench])"),
    "rloop": ("rloop", "new_event_loop", "pip install rloop (in kqfast[bench])"),
    "kqfast": ("kqfast", "new_event_loop", "kqfast's asyncio event loop"),
}


def factory(name: str):
    """The loop factory of `name`; ImportError/AttributeError when it is not there."""
    module, attr, _ = FACTORIES[name]
    return getattr(import_module(module), attr)


def missing(name: str) -> str | None:
    """Why loop `name` cannot run here, or None when it can."""
    module, attr, how = FACTORIES[name]
    try:
        mod = import_module(module)
    except ImportError as exc:
        return f"{module} is not installed ({how}): {exc}"
    if not callable(getattr(mod, attr, None)):
        version = getattr(mod, "__version__", "?")
        return f"{module}.{attr} does not exist in this build ({module} {version})"
    return None


async def forever() -> None:
    """Serves until the process is stopped.  Not Server.serve_forever(): rloop 0.5's starts
    serving a second time a server create_server has started, and stops accepting (or
    panics) from then on; the servers here already serve once create_server returns."""
    await asyncio.get_running_loop().create_future()


def run(main, name: str):
    """asyncio.run(main()) on a fresh loop from `name`'s factory."""
    make = factory(name)
    if sys.version_info >= (3, 11):
        with asyncio.Runner(loop_factory=make) as runner:
            return runner.run(main())
    loop = make()
    asyncio.set_event_loop(loop)
    try:
        return loop.run_until_complete(main())
    finally:
        asyncio.set_event_loop(None)
        loop.close()
