"""The client SDK: typed gRPC clients for the composer, the registry and the extractor."""

from poe.client.composer import Composer, ComposeResult
from poe.client.extractor import ExtractorClient
from poe.client.registry import RegistryClient

__all__ = ["ComposeResult", "Composer", "ExtractorClient", "RegistryClient"]
