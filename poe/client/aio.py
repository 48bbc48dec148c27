"""The asyncio clients: `AsyncComposer` and `AsyncRegistry`, on `grpc.aio` channels.

    from poe.client.aio import AsyncComposer

    async def main():
        async with AsyncComposer("127.0.0.1:50051") as c:
            result = await c.compose(classes=["Sandal", "Sneaker", "Bag"])   # a ComposeResult
            header = await c.describe(classes=["Bag"])                      # a ComposeHeader

Each asyncio client holds its blocking twin (`Composer`, `RegistryClient`) built on the asyncio
channel (the generated stubs work with both kinds) and shares everything with it but the waiting:
the channel's options (retry policy, load balancing, message sizes), TLS, the bearer token,
deadlines, the translation of errors into `poe.engine.errors` exceptions, the requests and the
checks of what comes back (a composed model's size and sha256, a downloaded blob's sha256). Make
and use a client inside the event loop that runs it (in a coroutine).
"""

from __future__ import annotations

import asyncio
import hashlib
import time
from collections.abc import AsyncIterator, Callable, Iterable
from typing import Any, ClassVar, Generic, Self, TypeVar

import grpc

from poe.client.base import MAX_ATTEMPTS, ClientTLS, GrpcClient
from poe.client.composer import Composer, ComposeResult
from poe.client.errors import translate_rpc_errors
from poe.client.registry import RegistryClient
from poe.contract import ComposeHeader
from poe.engine.config import Secret, Settings, settings
from poe.engine.errors import DataLoss, Unavailable
from poe.v1 import composer_pb2 as pb
from poe.v1 import registry_pb2 as r

Twin = TypeVar("Twin", bound=GrpcClient)


class AsyncGrpcClient(Generic[Twin]):
    """A client of one `poe.v1` service over one `grpc.aio` channel; `TWIN` is the blocking client
    of the same service, whose arguments (and defaults: target setting, deadline, retries, TLS)
    this one takes. With `channel=`, that channel is used as it is and `close` leaves it open."""

    TWIN: ClassVar[type[GrpcClient]]

    def __init__(self, target: str | None = None, *, channel: grpc.aio.Channel | None = None,
                 timeout: float | None = None, retries: int = MAX_ATTEMPTS - 1, token: str | Secret | None = None,
                 tls: ClientTLS | bool | None = None, config: Settings | None = None, lb_policy: str | None = None):
        self._own_channel = channel is None
        if channel is None:
            target = target or getattr(config or settings(), self.TWIN.ADDRESS_SETTING)
            channel, tls = self.TWIN.open_channel(target, tls=tls, config=config, retries=retries,
                                                  lb_policy=lb_policy, api=grpc.aio)
        self.channel = channel
        twin = self.TWIN(target, channel=channel, timeout=timeout, token=token, tls=tls, config=config)
        self._twin: Twin = twin  # type: ignore[assignment]

    @property
    def target(self) -> str:
        return self._twin.target

    @property
    def tls(self) -> bool:
        """Whether the channel is encrypted (with `channel=`: what `tls` said about it)."""
        return self._twin.tls

    @property
    def timeout(self) -> float:
        """The default deadline of a call, in seconds."""
        return self._twin.timeout

    @property
    def stub(self) -> Any:
        return self._twin.stub

    @property
    def metadata(self) -> tuple[tuple[str, str], ...] | None:
        """The call metadata this client sends (its bearer token), for calls made on `stub` directly."""
        return self._twin.metadata

    async def close(self) -> None:
        if self._own_channel:
            await self.channel.close()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()

    async def wait_ready(self, timeout: float = 10.0) -> None:
        """Wait until the channel connects (Unavailable after `timeout` seconds)."""
        try:
            await asyncio.wait_for(self.channel.channel_ready(), timeout)
        except TimeoutError:
            raise Unavailable(f"{self._twin._what}: not reachable within {timeout:.0f} s") from None

    # -- calls -------------------------------------------------------------------------------------

    async def _call(self, method: Callable, request, timeout: float | None = None):
        with translate_rpc_errors(self._twin._what):
            return await method(request, timeout=self._twin._deadline(timeout), metadata=self.metadata)

    async def _stream(self, method: Callable, request, timeout: float | None = None) -> AsyncIterator:
        """The messages of a server-streaming call; stopping early cancels the call on the server too."""
        call = method(request, timeout=self._twin._deadline(timeout), metadata=self.metadata)
        try:
            with translate_rpc_errors(self._twin._what):
                async for msg in call:
                    yield msg
        finally:
            call.cancel()


class AsyncComposer(AsyncGrpcClient[Composer]):
    """`poe.client.Composer` for asyncio: the same arguments, results and errors."""

    TWIN = Composer

    async def compose(self, classes: Iterable[str | int] = (), *, tasks: Iterable[str] = (), pool: str = "",
                      execution: str = "fused", format: str = "torchscript",
                      timeout: float | None = None) -> ComposeResult:
        """A composed model, its bytes checked against the header's size and sha256 (DataLoss otherwise)."""
        req = self._twin._request(pb.ComposeModelRequest, pool, classes, tasks, execution, format)
        t0 = time.perf_counter()
        messages = [msg async for msg in self._stream(self.stub.ComposeModel, req, timeout)]
        return self._twin._result(messages, t0)

    async def describe(self, classes: Iterable[str | int] = (), *, tasks: Iterable[str] = (), pool: str = "",
                       execution: str = "fused", format: str = "torchscript",
                       timeout: float | None = None) -> ComposeHeader:
        """The header `compose` would return, without building the model (size and sha256 only
        when it is cached)."""
        req = self._twin._request(pb.DescribeCompositionRequest, pool, classes, tasks, execution, format)
        return ComposeHeader.from_message((await self._call(self.stub.DescribeComposition, req, timeout)).header)


class AsyncRegistry(AsyncGrpcClient[RegistryClient]):
    """The reads of `poe.client.RegistryClient` for asyncio: pools, class resolution, blobs."""

    TWIN = RegistryClient

    async def get_pool(self, ref: str) -> r.PoolVersion:
        """"name", "name@version" or "name@alias"."""
        return (await self._call(self.stub.GetPool, r.GetPoolRequest(pool=ref))).pool

    async def list_pools(self, *, name: str = "", dataset: str = "", class_name: str = "", alias: str = "",
                         page_size: int = 0) -> AsyncIterator[r.PoolVersion]:
        """Every matching pool version (follows the pages)."""
        token = ""
        while True:
            resp = await self._call(self.stub.ListPools, r.ListPoolsRequest(
                name=name, dataset=dataset, class_name=class_name, alias=alias, page_size=page_size,
                page_token=token))
            for pool in resp.pools:
                yield pool
            token = resp.next_page_token
            if not token:
                return

    async def resolve_classes(self, pool: str, classes: Iterable[str | int] = (),
                              tasks: Iterable[str] = ()) -> r.ResolveClassesResponse:
        """Class names (or ids) and task names -> class ids, library and covering experts."""
        return await self._call(self.stub.ResolveClasses, r.ResolveClassesRequest(
            pool=pool, classes=[str(x) for x in classes], tasks=list(tasks)))

    async def download(self, sha256: str, *, offset: int = 0, length: int = 0) -> bytes:
        """A blob's bytes; a whole download is verified against its sha256 (DataLoss otherwise)."""
        request = r.DownloadRequest(sha256=sha256, offset=offset, length=length)
        data = b"".join([msg.data async for msg in self._stream(self.stub.Download, request)])
        if offset == 0 and length == 0 and hashlib.sha256(data).hexdigest() != sha256:
            raise DataLoss(f"blob {sha256[:12]}...: downloaded bytes do not match their sha256")
        return data
