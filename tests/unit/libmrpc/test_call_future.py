"""CallFuture.add_done_callback runs each callback exactly once."""

from __future__ import annotations

import threading

from libmrpc._session import Call
from libmrpc.stubs import CallFuture


class _RacingList(list):
    """A callbacks list whose append lets the reader thread complete the call
    right after the callback was added (the window of the bug)."""

    def __init__(self, call: Call) -> None:
        super().__init__()
        self.call = call
        self.reader: threading.Thread | None = None

    def append(self, item) -> None:  # type: ignore[override]
        super().append(item)
        self.reader = threading.Thread(target=self.call.finish, args=("ok", None))
        self.reader.start()
        self.reader.join(0.3)  # completes here unless a lock orders it after the add


def test_done_callback_runs_once_when_completion_races_the_add():
    call = Call(1, None, None, "/S/M")
    racing = call.callbacks = _RacingList(call)
    runs: list[object] = []
    fut = CallFuture(call, None)
    fut.add_done_callback(runs.append)
    assert racing.reader is not None
    racing.reader.join(5)
    print("callback ran", len(runs), "time(s)")
    assert runs == [fut]


def test_done_callback_after_completion_runs_immediately_once():
    call = Call(1, None, None, "/S/M")
    call.finish("ok", None)
    runs: list[object] = []
    CallFuture(call, None).add_done_callback(runs.append)
    assert len(runs) == 1
