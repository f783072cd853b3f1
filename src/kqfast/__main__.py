"""python -m kqfast: says what this kqfast is (version, backend, TLS engine, Python), or runs
one of its commands: python -m kqfast echo ... is kqfast-echo, python -m kqfast bench ... is
kqfast-bench (for an environment whose scripts directory is not on PATH)."""
from __future__ import annotations

import platform
import sys

import kqfast

USAGE = """\
usage: python -m kqfast                 what this kqfast is
       python -m kqfast echo [ARGS...]  kqfast-echo (python -m kqfast echo --help)
       python -m kqfast bench [ARGS...] kqfast-bench (python -m kqfast bench --help)"""


def hello() -> str:
    return "\n".join([
        f"kqfast {kqfast.__version__}: an asyncio event loop and TCP server on a C core",
        f"  backend     {kqfast.BACKEND}",
        f"  TLS engine  {kqfast.TLS_ENGINE}",
        f"  Python      {platform.python_version()} ({platform.python_implementation()}, "
        f"{sys.executable})",
        "  use it      kqfast.run(main())  or  uvicorn app:app --loop kqfast:new_event_loop",
    ])


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if not args:
        print(hello())
        return 0
    command, rest = args[0], args[1:]
    if command == "echo":
        from kqfast import cli
        return cli.main(rest)
    if command == "bench":
        from kqfast import bench_cli
        return bench_cli.main(rest)
    if command in ("-h", "--help"):
        print(USAGE)
        return 0
    if command == "--version":
        print(f"kqfast {kqfast.__version__}")
        return 0
    print(f"{USAGE}\npython -m kqfast: no command {command!r}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
