"""Generated protobuf and gRPC stubs of the ``mesh.v1`` API (``python -m mesh.protogen``)."""
