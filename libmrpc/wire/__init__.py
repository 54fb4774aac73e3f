"""The pure wire layer: bytes and memoryviews in, values out.

No module here opens a socket or file, maps memory, starts a thread, takes a lock
or reads the clock; the I/O shells (the app session, the daemon's engines) call
into it. tests/unit/test_layering.py keeps it that way.

- :mod:`libmrpc.wire.ring`: ring slot layout, descriptors, producer/consumer over a
  memoryview of shared memory
- :mod:`libmrpc.wire.frames`: daemon-to-daemon frame headers and the frame assembler
- :mod:`libmrpc.wire.layout`: message layouts computed from schema descriptors
- :mod:`libmrpc.wire.marshal`: the marshal/validate runtime generated code calls
- :mod:`libmrpc.wire.metadata`: the call metadata block codec and gRPC key rules
- :mod:`libmrpc.wire.heap`: the buddy allocator behind every message heap
- :mod:`libmrpc.wire.errors`: :class:`WireError`, bytes from an untrusted party are bad
"""

from libmrpc.wire.errors import TooBig, WireError

__all__ = ["TooBig", "WireError"]
