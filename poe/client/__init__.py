"""The client SDK: typed gRPC clients for the composer, the registry and the extractor, blocking
(`Composer`, `RegistryClient`, `ExtractorClient`) and asyncio (`AsyncComposer`, `AsyncRegistry`).

It needs neither torch nor numpy: `pip install poe-client` (clients/python) installs this package
with grpcio and protobuf only; torch is needed only to load a composed model (`ComposeResult.load`).
"""

from poe.client.aio import AsyncComposer, AsyncRegistry
from poe.client.composer import Composer, ComposeResult
from poe.client.extractor import ExtractorClient
from poe.client.registry import RegistryClient

__all__ = ["AsyncComposer", "AsyncRegistry", "ComposeResult", "Composer", "ExtractorClient", "RegistryClient"]
