"""A gRPC server not written in Rust (grpcio, gRPC's C core) for
goaway_notice_python.rs: serves echo.Echo/ServerStream as an endless stream
of EchoReply{message: index}, prints its port, and on a line on stdin stops
gracefully (GOAWAY, in-flight calls may finish within 5 s)."""

import sys
import time
from concurrent import futures

import grpc


def reply(index):
    message = str(index).encode()
    # EchoReply field 1 (message, a string): tag 0x0a, length, bytes.
    return b"\x0a" + bytes([len(message)]) + message


def server_stream(request, context):
    index = 0
    while context.is_active():
        yield reply(index)
        index += 1
        time.sleep(0.01)


def main():
    handler = grpc.method_handlers_generic_handler(
        "echo.Echo",
        {
            "ServerStream": grpc.unary_stream_rpc_method_handler(
                server_stream,
                request_deserializer=lambda raw: raw,
                response_serializer=lambda raw: raw,
            )
        },
    )
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=8))
    server.add_generic_rpc_handlers((handler,))
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    print(port, flush=True)
    sys.stdin.readline()
    stopped = server.stop(grace=5)
    print("stopping", flush=True)
    stopped.wait()


if __name__ == "__main__":
    main()
