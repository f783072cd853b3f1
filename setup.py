"""Builds kqfast's extensions.  KQFAST_BACKEND=auto|kqueue|epoll picks the poller; auto lets
the preprocessor choose (kqueue on macOS/BSD, epoll on Linux).  kqueue on Linux builds
against libkqueue, found with pkg-config."""
import os
import shlex
import subprocess
import sys

from Cython.Build import cythonize
from setuptools import Extension, setup

backend = os.environ.get("KQFAST_BACKEND", "auto")
if backend not in ("auto", "kqueue", "epoll"):
    sys.exit(f"KQFAST_BACKEND must be auto, kqueue or epoll, not {backend!r}")

macros, compile_args, link_args = [], [], []
if backend != "auto":
    macros.append((f"KQFAST_USE_{backend.upper()}", "1"))
if backend == "kqueue" and sys.platform.startswith("linux"):
    try:
        flags = subprocess.run(["pkg-config", "--cflags", "--libs", "libkqueue"],
                               check=True, capture_output=True, text=True).stdout
    except (OSError, subprocess.CalledProcessError):
        sys.exit("KQFAST_BACKEND=kqueue on Linux needs libkqueue, and pkg-config cannot find "
                 "it: build and install libkqueue (https://github.com/mheily/libkqueue) first")
    for flag in shlex.split(flags):
        (compile_args if flag.startswith("-I") else link_args).append(flag)


def extension(name: str, source: str) -> Extension:
    """An extension module on the shared C core: the socket helpers, and the poller, which
    sys.pxd includes into the module itself (so no source of its own here)."""
    return Extension(
        name,
        [source, "src/kqfast/netio.c", "src/kqfast/tls.c"],
        include_dirs=["src/kqfast"],
        define_macros=macros,
        # dlopen() and dlsym() find the interpreter's own OpenSSL (tls.c); in libc since
        # glibc 2.34, in libdl before (manylinux_2_28).
        libraries=["dl"] if sys.platform.startswith("linux") else [],
        # Hidden: only the module's init function (which Python marks visible) is exported,
        # so the compiler may inline the poller's functions into the loop and calls skip the
        # PLT.
        extra_compile_args=["-O2", "-Wall", "-Wno-unused-function", "-fvisibility=hidden"]
        + compile_args,
        extra_link_args=link_args,
    )


# _core is the server; _bench is kqfast-bench's load generator.
extensions = [extension("kqfast._core", "src/kqfast/_core.pyx"),
              extension("kqfast._bench", "src/kqfast/bench_client.pyx")]
setup(ext_modules=cythonize(extensions, include_path=["src"]))
