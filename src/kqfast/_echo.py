"""The echo protocols of kqfast-echo --handler python: the native handlers' behaviour through
the Python Protocol API."""
import asyncio

from kqfast._core import LineProtocol


class EchoProtocol(asyncio.Protocol):
    """Raw echo: every byte goes back; at EOF, flush and close."""

    def connection_made(self, transport):
        self.transport = transport

    def data_received(self, data):
        self.transport.write(data)


class LineEchoProtocol(LineProtocol):
    """The tutorial's line echo: each line back with its terminator; a blank line closes."""

    def connection_made(self, transport):
        self.transport = transport

    def line_received(self, line):
        if line.strip():
            self.transport.write(line)
        else:
            self.transport.close()
