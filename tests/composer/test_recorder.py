"""The composer's recorder sends recordings in the pauses between compositions, not during them,
unless its queue is half full; flush and close never wait for a pause."""

from __future__ import annotations

import threading
import time

from poe_services.composer.recorder import Recorder

QUIET = 0.3


def _wait_for(predicate, timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)
    return True


def test_recordings_wait_for_a_pause_in_compositions():
    sent: list[tuple[str, float]] = []
    lock = threading.Lock()

    def send(name: str):
        def put() -> None:
            with lock:
                sent.append((name, time.monotonic()))
        return put

    recorder = Recorder(8, lambda puts: [put() for put in puts], quiet=QUIET)
    try:
        with recorder.composing():
            assert recorder.submit("m0", send("m0"))
            time.sleep(QUIET + 0.2)
            assert sent == []  # a composition runs: the recording waits
            ended = time.monotonic()
        assert _wait_for(lambda: len(sent) == 1)
        assert sent[0][1] - ended >= QUIET * 0.9  # and then for the quiet time

        with recorder.composing():  # a half-full queue is sent, composing or not, in one batch
            for i in range(3):
                assert recorder.submit(f"h{i}", send(f"h{i}"))
            time.sleep(QUIET + 0.2)
            assert len(sent) == 1 and recorder.pending == 3
            assert recorder.submit("h3", send("h3"))
            assert _wait_for(lambda: len(sent) == 5)
            assert [name for name, _ in sent] == ["m0", "h0", "h1", "h2", "h3"]

            assert recorder.submit("f0", send("f0"))
            t0 = time.monotonic()
            assert recorder.flush(5)  # does not wait for the composition to end
            assert time.monotonic() - t0 < QUIET
            assert [name for name, _ in sent][-1] == "f0"

            assert recorder.submit("c0", send("c0"))
        t0 = time.monotonic()
    finally:
        recorder.close(5)  # close sends what is queued without waiting for the quiet time
    assert [name for name, _ in sent][-1] == "c0" and time.monotonic() - t0 < QUIET
