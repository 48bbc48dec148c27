"""The base of the typed gRPC clients: one channel, deadlines, retries and error translation.

A subclass names its service, its stub, the `poe.engine.config.Settings` field with its default
address, its default deadline and the methods that may be retried; its methods call `_call`
(unary or client-streaming) and `_stream` (server-streaming), which raise `poe.engine.errors`
exceptions instead of grpc.RpcError.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from typing import Any, ClassVar, Self

import grpc
from google.protobuf.descriptor import ServiceDescriptor

from poe.client.errors import translate_rpc_errors
from poe.engine.errors import Unavailable

MAX_MESSAGE_BYTES = 8 << 20  # models and blobs are streamed in 1 MiB chunks; this leaves headroom
MAX_ATTEMPTS = 5  # gRPC treats a retryPolicy's maxAttempts above 5 as 5


class GrpcClient:
    """A client of one `poe.v1` service over one channel.

    Deadlines: every call carries one (`timeout` seconds, the client's default unless the method
    is given another); a deadline covers the call's retries too.

    Retries are gRPC's own, configured in the channel's service config (`grpc.service_config`,
    `grpc.enable_retries`): a call that fails with UNAVAILABLE is attempted again up to `retries`
    times (at most 4), after an exponential, jittered backoff from 0.1 s to 2 s, and a streamed
    response only while none of its messages has arrived. `retryThrottling` stops retrying on a
    channel whose calls mostly fail (a server that is down is not hammered by every client).
    Only the methods a subclass lists in `RETRYABLE` are retried, by method name: reads, and
    ComposeModel (the same request composes the same bytes). Writes are not: a write whose answer
    was lost may have been applied, and doing it again may act twice or fail where the first call
    succeeded (DeletePoolAlias, CreateExtractionJob, StartExtraction...); client-streaming uploads
    would have to be buffered to be replayed. Callers that want a write retried decide it
    themselves. With `channel=`, the given channel is used as it is (its own options and service
    config apply) and `close` leaves it open.
    """

    SERVICE: ClassVar[ServiceDescriptor]
    STUB: ClassVar[Callable[[grpc.Channel], Any]]
    ADDRESS_SETTING: ClassVar[str]  # the Settings field with the default target
    DEFAULT_TIMEOUT: ClassVar[float] = 60.0
    RETRYABLE: ClassVar[tuple[str, ...]] = ()

    def __init_subclass__(cls, **kwargs) -> None:
        super().__init_subclass__(**kwargs)
        unknown = sorted(set(cls.RETRYABLE) - set(cls.SERVICE.methods_by_name))
        if unknown:
            raise TypeError(f"{cls.__name__}.RETRYABLE: {cls.SERVICE.full_name} has no method {', '.join(unknown)}")

    def __init__(self, target: str | None = None, *, channel: grpc.Channel | None = None,
                 timeout: float | None = None, retries: int = MAX_ATTEMPTS - 1):
        if target is None and channel is None:
            from poe.engine.config import settings

            target = getattr(settings(), self.ADDRESS_SETTING)
        self.target = target or "<channel>"
        self.timeout = self.DEFAULT_TIMEOUT if timeout is None else timeout
        self._own_channel = channel is None
        self.channel = channel or grpc.insecure_channel(target, options=self.channel_options(retries))
        self.stub = self.STUB(self.channel)
        self._what = f"{self.SERVICE.name.lower()} at {self.target}"

    @classmethod
    def channel_options(cls, retries: int = MAX_ATTEMPTS - 1) -> list[tuple[str, int | str]]:
        """Options of the channels this client makes: message sizes, retries, reconnect backoff."""
        return [("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
                ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
                ("grpc.enable_retries", 1),
                ("grpc.service_config", json.dumps(cls.service_config(retries))),
                # A retry finds a restarted server only once the channel reconnects; gRPC's default
                # first reconnect waits 1 s, longer than the retries' backoff altogether.
                ("grpc.initial_reconnect_backoff_ms", 100),
                ("grpc.max_reconnect_backoff_ms", 5000)]

    @classmethod
    def service_config(cls, retries: int = MAX_ATTEMPTS - 1) -> dict:
        """The channel's service config: the retry policy of the RETRYABLE methods (none for
        `retries` 0)."""
        attempts = min(retries + 1, MAX_ATTEMPTS)
        if attempts < 2 or not cls.RETRYABLE:
            return {}
        return {
            "methodConfig": [{
                "name": [{"service": cls.SERVICE.full_name, "method": m} for m in cls.RETRYABLE],
                "retryPolicy": {"maxAttempts": attempts, "initialBackoff": "0.1s", "maxBackoff": "2s",
                                "backoffMultiplier": 2, "retryableStatusCodes": ["UNAVAILABLE"]},
            }],
            # Retries stop while the channel's failures outnumber its successes (10 tokens, each
            # failure takes 1, each success gives back 0.1); see gRFC A6.
            "retryThrottling": {"maxTokens": 10, "tokenRatio": 0.1},
        }

    def close(self) -> None:
        if self._own_channel:
            self.channel.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def wait_ready(self, timeout: float = 10.0) -> None:
        """Block until the channel connects (Unavailable after `timeout` seconds)."""
        try:
            grpc.channel_ready_future(self.channel).result(timeout=timeout)
        except grpc.FutureTimeoutError:
            raise Unavailable(f"{self._what}: not reachable within {timeout:.0f} s") from None

    # -- calls -------------------------------------------------------------------------------------

    def _deadline(self, timeout: float | None) -> float | None:
        return self.timeout if timeout is None else timeout

    def _call(self, method: Callable, request, timeout: float | None = None):
        """A unary or client-streaming call (`request` an iterator of messages for the latter)."""
        with translate_rpc_errors(self._what):
            return method(request, timeout=self._deadline(timeout))

    def _stream(self, method: Callable, request, timeout: float | None = None, *,
                unbounded: bool = False) -> Iterator:
        """The messages of a server-streaming call; stopping early cancels the call on the server
        too. `unbounded`: no deadline when `timeout` is None (a watch that may last for hours)."""
        call = method(request, timeout=timeout if unbounded else self._deadline(timeout))
        try:
            with translate_rpc_errors(self._what):
                yield from call
        finally:
            call.cancel()

    def _list(self, method: Callable, request_cls, items: str, **fields) -> Iterator:
        """Every item of a paginated List call: `request_cls(**fields)` page after page, the items
        in the response's repeated field `items`, until `next_page_token` is empty."""
        token = ""
        while True:
            resp = self._call(method, request_cls(page_token=token, **fields))
            yield from getattr(resp, items)
            token = resp.next_page_token
            if not token:
                return
