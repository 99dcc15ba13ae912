"""A received gRPC message filled in place: a `bytes` of known length and a writable view onto it.

Every consumer of a received message wants `bytes` (protobuf, the relay's raw hand-off, the
batching writer and the resume window tell data messages from others by that type), and a bulk
message is 1 MiB arriving over several reads. Assembling it in a bytearray and converting costs a
full copy per message; here the `bytes` object is allocated once, uninitialised, at its final
length (known from the 5-byte gRPC prefix), and the transport's reads land in it through the view
(asyncio.BufferedProtocol), so the kernel's copy is the only one.

The object is written only while it is being assembled, before anyone else holds a reference or has
hashed it; from `finish` on it is an ordinary immutable `bytes`. Outside CPython (no C API) the
message is a bytearray converted once at the end: one copy, as before.
"""

from __future__ import annotations

import ctypes
import sys
from typing import Final

#: PyBUF_WRITE (CPython's buffer flags): the view may be written to.
_PYBUF_WRITE: Final = 0x200


class _CApi:
    """The three CPython functions used (looked up once, on first use)."""

    def __init__(self) -> None:
        api = ctypes.pythonapi
        self.new_bytes = api.PyBytes_FromStringAndSize
        self.new_bytes.argtypes = (ctypes.c_void_p, ctypes.c_ssize_t)
        self.new_bytes.restype = ctypes.py_object
        self.address = api.PyBytes_AsString
        self.address.argtypes = (ctypes.py_object,)
        self.address.restype = ctypes.c_void_p
        self.view = api.PyMemoryView_FromMemory
        self.view.argtypes = (ctypes.c_void_p, ctypes.c_ssize_t, ctypes.c_int)
        self.view.restype = ctypes.py_object


_api: _CApi | None = _CApi() if sys.implementation.name == "cpython" else None


def new_message(length: int) -> tuple[bytes | bytearray, memoryview]:
    """A message of `length` bytes to fill (uninitialised) and a writable view of all of it.

    Hand the first item to `finish` once every byte was written. `length` must already have been
    checked against the largest message accepted: this allocates it.
    """
    if _api is None or length == 0:
        holder = bytearray(length)
        return holder, memoryview(holder)
    message: bytes = _api.new_bytes(None, length)
    view: memoryview = _api.view(_api.address(message), length, _PYBUF_WRITE)
    return message, view


def finish(holder: bytes | bytearray) -> bytes:
    """The completed message as `bytes` (no copy on CPython)."""
    return holder if isinstance(holder, bytes) else bytes(holder)
