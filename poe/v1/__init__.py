"""Generated protobuf and gRPC stubs (package poe.v1); `python -m poe.protogen`."""
