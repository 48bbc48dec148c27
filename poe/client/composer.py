"""Client SDK for the composer: `Composer(target).compose(classes=[...])`.

    from poe.client.composer import Composer
    with Composer("127.0.0.1:50051") as c:
        result = c.compose(classes=["Sandal", "Sneaker", "Bag"])
        model, meta = result.load()          # a TorchScript module and its poe.json
        result.save("model.pt")

Every result is verified: the streamed bytes must match the header's size and sha256 (DataLoss
otherwise). Calls carry a deadline and are retried with backoff while the server is UNAVAILABLE.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import grpc

from poe.client.errors import translate_rpc_errors
from poe.engine.errors import DataLoss, Unavailable
from poe.v1 import composer_pb2 as pb
from poe.v1 import composer_pb2_grpc

_EXECUTION = {"fused": pb.EXECUTION_FUSED, "reference": pb.EXECUTION_REFERENCE}
_FORMAT = {"torchscript": pb.MODEL_FORMAT_TORCHSCRIPT, "safetensors": pb.MODEL_FORMAT_SAFETENSORS}
_FORMAT_NAME = {v: k for k, v in _FORMAT.items()}
_EXECUTION_NAME = {v: k for k, v in _EXECUTION.items()}


def header_dict(h: pb.ComposedModelHeader) -> dict:
    return {"model_id": h.model_id, "pool": h.pool, "classes": list(h.classes), "class_ids": list(h.class_ids),
            "tasks": list(h.tasks), "expert_ids": list(h.expert_ids), "params": h.params, "flops": h.flops,
            "size": h.size, "sha256": h.sha256, "format": _FORMAT_NAME.get(h.format, "torchscript"),
            "execution": _EXECUTION_NAME.get(h.execution, "fused"), "input_shape": list(h.input_shape),
            "expected_accuracy": h.expected_accuracy, "cache_hit": h.cache_hit,
            "metadata": json.loads(h.metadata_json) if h.metadata_json else {}}


@dataclass
class ComposeResult:
    header: dict
    data: bytes
    seconds: float  # end to end, as the client saw it

    def load(self):
        """(TorchScript module, poe.json) for a TorchScript result."""
        from poe.engine.export import load_torchscript

        return load_torchscript(self.data)

    def save(self, path: str | os.PathLike) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_bytes(self.data)
        os.replace(tmp, path)
        return path


class Composer:
    def __init__(self, target: str | None = None, *, timeout: float = 30.0, retries: int = 4,
                 channel: grpc.Channel | None = None):
        if target is None and channel is None:
            from poe.engine.config import settings

            target = settings().composer_addr
        self.target = target or "<channel>"
        self._own = channel is None
        self.channel = channel or grpc.insecure_channel(
            target, options=[("grpc.max_receive_message_length", 8 << 20)])
        self.stub = composer_pb2_grpc.ComposerStub(self.channel)
        self.timeout, self.retries = timeout, retries

    def close(self) -> None:
        if self._own:
            self.channel.close()

    def __enter__(self) -> Composer:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _request(self, cls, pool, classes, tasks, execution, format):
        return cls(pool=pool, classes=[str(c) for c in classes or ()], tasks=list(tasks or ()),
                   execution=_EXECUTION[execution], format=_FORMAT[format])

    def _retrying(self, fn):
        delay = 0.1
        for attempt in range(self.retries + 1):
            try:
                with translate_rpc_errors(f"composer at {self.target}"):
                    return fn()
            except Unavailable as e:
                if attempt == self.retries or "deadline exceeded" in str(e):
                    raise
                time.sleep(delay)
                delay = min(delay * 2, 2.0)

    def compose(self, classes: Iterable[str | int] = (), *, tasks: Iterable[str] = (), pool: str = "",
                execution: str = "fused", format: str = "torchscript", timeout: float | None = None) -> ComposeResult:
        req = self._request(pb.ComposeModelRequest, pool, classes, tasks, execution, format)

        def call() -> ComposeResult:
            t0 = time.perf_counter()
            header, parts = None, []
            for msg in self.stub.ComposeModel(req, timeout=timeout or self.timeout):
                if msg.HasField("header"):
                    header = header_dict(msg.header)
                else:
                    parts.append(msg.chunk)
            data = b"".join(parts)
            if header is None:
                raise DataLoss("composer sent no header")
            if len(data) != header["size"] or hashlib.sha256(data).hexdigest() != header["sha256"]:
                raise DataLoss(f"composed model {header['model_id']}: received {len(data)} bytes that do not match "
                               f"the header's size {header['size']} and sha256")
            return ComposeResult(header, data, time.perf_counter() - t0)

        return self._retrying(call)

    def describe(self, classes: Iterable[str | int] = (), *, tasks: Iterable[str] = (), pool: str = "",
                 execution: str = "fused", format: str = "torchscript", timeout: float | None = None) -> dict:
        req = self._request(pb.DescribeCompositionRequest, pool, classes, tasks, execution, format)
        return self._retrying(lambda: header_dict(
            self.stub.DescribeComposition(req, timeout=timeout or self.timeout).header))
