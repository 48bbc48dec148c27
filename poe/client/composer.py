"""Client SDK for the composer: `Composer(target).compose(classes=[...])`.

    from poe.client.composer import Composer
    with Composer("127.0.0.1:50051") as c:
        result = c.compose(classes=["Sandal", "Sneaker", "Bag"])
        model, meta = result.load()          # a TorchScript module and its poe.json
        result.save("model.pt")
        result.header.params                 # a poe.contract.ComposeHeader

Every result is verified: the streamed bytes must match the header's size and sha256 (DataLoss
otherwise). Calls carry a deadline and are retried with backoff while the server is UNAVAILABLE
(see `poe.client.base.GrpcClient`, also for TLS).

Loading a model runs code that came with it (TorchScript and pt2 programs, ONNX graphs), so `load`
checks the bytes against the header's sha256 again and only loads what came over TLS or from this
machine (a loopback target or a Unix socket); a model that crossed a network in plaintext could have
been replaced on the way, header included. `load(allow_insecure=True)` loads it anyway.

The asyncio twin, `poe.client.aio.AsyncComposer`, has the same methods as coroutines. Where only
the slim distribution is installed (`pip install poe-client`, no torch), everything but `load`
works; `poe-client[torch]` adds torch, with which `load` reads TorchScript and pt2 models.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import time
import warnings
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from poe.client.base import GrpcClient, is_local_target
from poe.contract import EXECUTIONS, FORMATS, ComposeHeader
from poe.engine.errors import DataLoss, FailedPrecondition, field_error
from poe.v1 import composer_pb2 as pb
from poe.v1 import composer_pb2_grpc


@dataclass
class ComposeResult:
    header: ComposeHeader
    data: bytes
    seconds: float  # end to end, as the client saw it
    source: str = ""  # the composer's target
    tls: bool = False  # whether it arrived over TLS

    def load(self, *, allow_insecure: bool = False):
        """(model, poe.json) for a TorchScript, pt2 or ONNX result (ONNX runs on onnxruntime).

        Refuses (DataLoss) bytes that do not match the header's sha256, and (FailedPrecondition) a
        model that came in plaintext from another machine unless `allow_insecure`."""
        if hashlib.sha256(self.data).hexdigest() != self.header.sha256:
            raise DataLoss(f"composed model {self.header.model_id}: the bytes do not match the header's sha256; "
                           "not loading them")
        if not (self.tls or is_local_target(self.source) or allow_insecure):
            raise FailedPrecondition(
                f"composed model {self.header.model_id} came from {self.source or 'a channel'} without TLS, so "
                "anyone on the network could have replaced it, and loading a model runs its code: connect with "
                "TLS (POE_TLS_CA, or Composer(..., tls=...)), or pass allow_insecure=True if you trust the network")
        try:
            from poe.engine.export import load_model
        except ModuleNotFoundError as e:
            if e.name != "poe.engine.export":
                raise
            return _load_with_torch(self)  # the slim distribution: no engine
        return load_model(self.data)[:2]

    def save(self, path: str | os.PathLike) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_bytes(self.data)
        os.replace(tmp, path)
        return path


def _load_with_torch(result: ComposeResult) -> tuple:
    """`load` where the engine is not installed (the slim client): TorchScript and pt2 models with
    torch alone (the extra `poe-client[torch]`)."""
    try:
        import torch
    except ModuleNotFoundError:
        raise FailedPrecondition("loading a composed model needs torch: pip install 'poe-client[torch]' "
                                 "(or use the bytes as they are: save())") from None
    extra = {"poe.json": ""}
    if result.header.format == "torchscript":
        with warnings.catch_warnings():  # torch 2.13 marks torch.jit.load deprecated; TorchScript stays the default
            warnings.filterwarnings("ignore", message=r"`torch\.jit\.load` is deprecated", category=DeprecationWarning)
            model = torch.jit.load(io.BytesIO(result.data), map_location="cpu", _extra_files=extra).eval()
    elif result.header.format == "pt2":
        model = torch.export.load(io.BytesIO(result.data), extra_files=extra).module()
    else:
        raise FailedPrecondition(f"composed model {result.header.model_id}: the slim client loads TorchScript and "
                                 f"pt2 models, not {result.header.format}; save() it and open it with its runtime")
    return model, json.loads(extra["poe.json"])


class Composer(GrpcClient):
    SERVICE = pb.DESCRIPTOR.services_by_name["Composer"]
    STUB = composer_pb2_grpc.ComposerStub
    ADDRESS_SETTING = "composer_addr"
    DEFAULT_TIMEOUT = 30.0
    RETRYABLE = ("ComposeModel", "DescribeComposition")  # the same request gives the same model
    SINGLE_THREADED_STREAMS = True  # ComposeModel: a header and a few chunks

    @staticmethod
    def _request(cls, pool, classes, tasks, execution, format):
        if execution not in EXECUTIONS:
            raise field_error("execution", f"expected one of {', '.join(EXECUTIONS)}, got {execution!r}")
        if format not in FORMATS:
            raise field_error("format", f"expected one of {', '.join(FORMATS)}, got {format!r}")
        return cls(pool=pool, classes=[str(c) for c in classes or ()], tasks=list(tasks or ()),
                   execution=EXECUTIONS[execution], format=FORMATS[format])

    def compose(self, classes: Iterable[str | int] = (), *, tasks: Iterable[str] = (), pool: str = "",
                execution: str = "fused", format: str = "torchscript", timeout: float | None = None) -> ComposeResult:
        req = self._request(pb.ComposeModelRequest, pool, classes, tasks, execution, format)
        t0 = time.perf_counter()
        return self._result(self._stream(self.stub.ComposeModel, req, timeout), t0)

    def _result(self, messages: Iterable[pb.ComposeModelResponse], t0: float) -> ComposeResult:
        """The verified result of ComposeModel's messages (a header, then chunks) from a call made at `t0`."""
        header, parts = None, []
        for msg in messages:
            if msg.HasField("header"):
                header = ComposeHeader.from_message(msg.header)
            else:
                parts.append(msg.chunk)
        data = b"".join(parts)
        if header is None:
            raise DataLoss("composer sent no header")
        if len(data) != header.size or hashlib.sha256(data).hexdigest() != header.sha256:
            raise DataLoss(f"composed model {header.model_id}: received {len(data)} bytes that do not match "
                           f"the header's size {header.size} and sha256")
        return ComposeResult(header, data, time.perf_counter() - t0, self.target, self.tls)

    def describe(self, classes: Iterable[str | int] = (), *, tasks: Iterable[str] = (), pool: str = "",
                 execution: str = "fused", format: str = "torchscript",
                 timeout: float | None = None) -> ComposeHeader:
        """The header `compose` would return, without building the model (size and sha256 only
        when it is cached)."""
        req = self._request(pb.DescribeCompositionRequest, pool, classes, tasks, execution, format)
        return ComposeHeader.from_message(self._call(self.stub.DescribeComposition, req, timeout).header)
