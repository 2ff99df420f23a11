"""OTLP receivers on loopback for the tests: gRPC (the collector services from opentelemetry-proto,
served by grpcio) and HTTP/protobuf (http.server), plus a black hole (accepts, never answers) and
a closed port. What arrives is decoded with the official protobuf messages."""

from __future__ import annotations

import socket
import threading
from concurrent import futures
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class Received:
    """Decoded ExportTraceServiceRequest / ExportMetricsServiceRequest messages, thread-safe."""

    def __init__(self):
        self.lock = threading.Lock()
        self.traces: list = []
        self.metrics: list = []
        self.headers: list[dict] = []

    def spans(self) -> list:
        with self.lock:
            return [s for req in self.traces for rs in req.resource_spans for ss in rs.scope_spans for s in ss.spans]

    def resources(self) -> list:
        with self.lock:
            return [rs.resource for req in self.traces for rs in req.resource_spans]

    def metric_list(self) -> list:
        with self.lock:
            return [m for req in self.metrics for rm in req.resource_metrics for sm in rm.scope_metrics for m in sm.metrics]


class GrpcReceiver(Received):
    def __init__(self):
        super().__init__()
        import grpc
        from opentelemetry.proto.collector.metrics.v1 import metrics_service_pb2 as mpb
        from opentelemetry.proto.collector.metrics.v1 import metrics_service_pb2_grpc as mgrpc
        from opentelemetry.proto.collector.trace.v1 import trace_service_pb2 as tpb
        from opentelemetry.proto.collector.trace.v1 import trace_service_pb2_grpc as tgrpc

        rec = self

        class Traces(tgrpc.TraceServiceServicer):
            def Export(self, request, context):
                with rec.lock:
                    rec.traces.append(request)
                    rec.headers.append(dict(context.invocation_metadata()))
                return tpb.ExportTraceServiceResponse()

        class Metrics(mgrpc.MetricsServiceServicer):
            def Export(self, request, context):
                with rec.lock:
                    rec.metrics.append(request)
                    rec.headers.append(dict(context.invocation_metadata()))
                return mpb.ExportMetricsServiceResponse()

        self.server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
        tgrpc.add_TraceServiceServicer_to_server(Traces(), self.server)
        mgrpc.add_MetricsServiceServicer_to_server(Metrics(), self.server)
        self.port = self.server.add_insecure_port("127.0.0.1:0")
        self.server.start()
        self.endpoint = f"http://127.0.0.1:{self.port}"

    def close(self):
        self.server.stop(0)


class HttpReceiver(Received):
    def __init__(self):
        super().__init__()
        from opentelemetry.proto.collector.metrics.v1 import metrics_service_pb2 as mpb
        from opentelemetry.proto.collector.trace.v1 import trace_service_pb2 as tpb

        rec = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                if self.path == "/v1/traces":
                    msg, resp = tpb.ExportTraceServiceRequest.FromString(body), tpb.ExportTraceServiceResponse()
                    box = rec.traces
                elif self.path == "/v1/metrics":
                    msg, resp = mpb.ExportMetricsServiceRequest.FromString(body), mpb.ExportMetricsServiceResponse()
                    box = rec.metrics
                else:
                    self.send_error(404)
                    return
                with rec.lock:
                    box.append(msg)
                    rec.headers.append({k.lower(): v for k, v in self.headers.items()})
                out = resp.SerializeToString()
                self.send_response(200)
                self.send_header("Content-Type", "application/x-protobuf")
                self.send_header("Content-Length", str(len(out)))
                self.end_headers()
                self.wfile.write(out)

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.port = self.server.server_address[1]
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        self.endpoint = f"http://127.0.0.1:{self.port}"

    def close(self):
        self.server.shutdown()
        self.server.server_close()


class BlackHole:
    """Accepts TCP connections and never reads or answers (a hung collector)."""

    def __init__(self):
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(64)
        self.port = self.sock.getsockname()[1]
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self.accepted: list = []
        self._stop = False
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self):
        while not self._stop:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.accepted.append(conn)  # held open, never read

    def close(self):
        self._stop = True
        for c in self.accepted:
            c.close()
        self.sock.close()


def closed_port_endpoint() -> str:
    """An endpoint where nothing listens (connection refused)."""
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return f"http://127.0.0.1:{port}"
