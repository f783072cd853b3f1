"""Runs one test module of CPython's test_asyncio and writes one JSON line per test outcome
to the file named by argv[2] as it goes (so a module that hangs still tells which test).  The
first line names the loop class asyncio's default loop factory makes here, so run.py can tell
a run that was meant for kqfast's loop but did not get it (sitecustomize.py not imported)."""
import json
import signal
import sys
import unittest
from asyncio import unix_events


class Recorder(unittest.TextTestResult):
    def __init__(self, out, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.out = out

    def note(self, test, outcome, detail=""):
        self.out.write(json.dumps({"test": test.id(), "outcome": outcome, "detail": detail}) + "\n")
        self.out.flush()

    def startTest(self, test):
        super().startTest(test)
        self.note(test, "started")

    def addSuccess(self, test):
        super().addSuccess(test)
        self.note(test, "ok")

    def addFailure(self, test, err):
        super().addFailure(test, err)
        self.note(test, "fail", self.failures[-1][1])

    def addError(self, test, err):
        super().addError(test, err)
        self.note(test, "error", self.errors[-1][1])

    def addSkip(self, test, reason):
        super().addSkip(test, reason)
        self.note(test, "skip", reason)

    def addExpectedFailure(self, test, err):
        super().addExpectedFailure(test, err)
        self.note(test, "ok")

    def addUnexpectedSuccess(self, test):
        super().addUnexpectedSuccess(test)
        self.note(test, "fail", "unexpected success")

    def addSubTest(self, test, subtest, err):
        super().addSubTest(test, subtest, err)
        if err is not None:
            kind = "fail" if issubclass(err[0], test.failureException) else "error"
            self.note(test, kind, self._exc_info_to_string(err, test))


def main():
    name, path = sys.argv[1], sys.argv[2]
    # A runner started in the background inherits an ignored SIGINT, and asyncio.run's
    # Ctrl-C tests (interrupt_main) would then wait forever, on any loop.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    factory = unix_events._UnixDefaultEventLoopPolicy._loop_factory
    with open(path, "w") as out:
        out.write(json.dumps({"loop": f"{factory.__module__}.{factory.__qualname__}"}) + "\n")
        try:
            suite = unittest.defaultTestLoader.loadTestsFromName(name)
        except unittest.SkipTest as exc:  # a whole module for another platform (Windows)
            out.write(json.dumps({"test": name, "outcome": "skip", "detail": str(exc)}) + "\n")
            return
        runner = unittest.TextTestRunner(
            stream=sys.stderr, verbosity=1,
            resultclass=lambda *a, **k: Recorder(out, *a, **k))
        runner.run(suite)


if __name__ == "__main__":
    main()
