"""gRPC front end: gridserve.proto, its generated stubs (gridserve_pb2*.py) and the grpc.aio server
(grpc_server.py: serve_grpc_forever, create_grpc_server)."""
