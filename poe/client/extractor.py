"""A small typed client of `poe.v1.Extractor` (used by `poe extract` and the tests).

    with ExtractorClient("127.0.0.1:50051") as ex:
        job = ex.start({"dataset": "fashion-mnist", "oracle": {"registry_id": 1}, "pool_version": "2"})
        for update in ex.watch(job.id):                     # WatchExtractionResponse
            print(update.progress.phase, update.job.progress)
        final = ex.wait(job.id, timeout=3600)               # the terminal ExtractionJob

Methods raise `poe.engine.errors` exceptions (InvalidArgument, NotFound, ...) instead of grpc.RpcError.
Importing this module does not import torch.
"""

from __future__ import annotations

import time
from collections.abc import Iterator

from google.protobuf.json_format import ParseDict, ParseError

from poe.client.base import GrpcClient
from poe.contract import TERMINAL_STATES, state_value
from poe.engine.errors import InvalidArgument, PoeError, Unavailable
from poe.v1 import common_pb2 as c
from poe.v1 import extractor_pb2 as pb
from poe.v1 import extractor_pb2_grpc


def params_message(params: pb.ExtractionParams | dict) -> pb.ExtractionParams:
    """ExtractionParams from a message or a dict with the proto's field names."""
    if isinstance(params, pb.ExtractionParams):
        return params
    try:
        return ParseDict(params, pb.ExtractionParams())
    except ParseError as e:
        raise InvalidArgument(f"params: {e}") from None


class ExtractorClient(GrpcClient):
    SERVICE = pb.DESCRIPTOR.services_by_name["Extractor"]
    STUB = extractor_pb2_grpc.ExtractorStub
    ADDRESS_SETTING = "extractor_addr"
    DEFAULT_TIMEOUT = 120.0
    RETRYABLE = ("GetExtraction", "ListExtractions", "WatchExtraction")

    def start(self, params: pb.ExtractionParams | dict, job_id: str = "") -> c.ExtractionJob:
        return self._call(self.stub.StartExtraction,
                          pb.StartExtractionRequest(params=params_message(params), job_id=job_id)).job

    def get(self, job_id: str) -> pb.GetExtractionResponse:
        return self._call(self.stub.GetExtraction, pb.GetExtractionRequest(job_id=job_id))

    def cancel(self, job_id: str) -> c.ExtractionJob:
        return self._call(self.stub.CancelExtraction, pb.CancelExtractionRequest(job_id=job_id)).job

    def list(self, state: str | None = None, page_size: int = 0) -> Iterator[c.ExtractionJob]:
        """All matching jobs, newest first (follows the pages); `state` a state name or None (any)."""
        return self._list(self.stub.ListExtractions, pb.ListExtractionsRequest, "jobs", state=state_value(state),
                          page_size=page_size)

    def watch(self, job_id: str, timeout: float | None = None) -> Iterator[pb.WatchExtractionResponse]:
        """One stream of updates; it ends after a terminal state (or when the extractor stops)."""
        return self._stream(self.stub.WatchExtraction, pb.WatchExtractionRequest(job_id=job_id), timeout,
                            unbounded=True)

    def follow(self, job_id: str, timeout: float | None = None,
               reconnect_for: float = 120.0) -> Iterator[pb.WatchExtractionResponse]:
        """Updates until the job is terminal, watching again when a stream ends early (the
        extractor restarted) and while the extractor is unreachable for up to `reconnect_for` s."""
        deadline = None if timeout is None else time.monotonic() + timeout
        down_since = None
        while True:
            left = None if deadline is None else deadline - time.monotonic()
            if left is not None and left <= 0:
                raise Unavailable(f"{self._what}: job {job_id} did not finish within {timeout:.0f} s")
            last = None
            try:
                for update in self.watch(job_id, timeout=left):
                    down_since = None
                    last = update
                    yield update
            except Unavailable:
                down_since = down_since or time.monotonic()
                if time.monotonic() - down_since > reconnect_for:
                    raise
            if last is not None and last.job.state in TERMINAL_STATES:
                return
            time.sleep(0.5)

    def wait(self, job_id: str, timeout: float | None = None) -> c.ExtractionJob:
        """Block until the job is terminal; returns its record."""
        last = None
        for update in self.follow(job_id, timeout):
            last = update
        if last is None:  # pragma: no cover - follow() returns only after a terminal update
            raise PoeError(f"job {job_id}: no update")
        return last.job
