"""`vla-rft serve`: the deployed policy behind an HTTP endpoint that batches concurrent requests.

    vla-rft serve model=runs/export/policy.onnx                 # onnxruntime; no torch is imported
    vla-rft serve model=runs/sft backend=torch_compiled         # PyTorch (a checkpoint or run dir)
    vla-rft client url=http://127.0.0.1:8000                    # smoke test (client.py)

Protocol: HTTP/1.1 + JSON (protocol.py), from the standard library alone. Why not openpi's websocket +
msgpack-numpy: msgpack is not installed here and would be a new dependency on both the robot and the
server, for little gain at this policy's sizes. A request is one 64x64 RGB frame (12 KB; 16 KB in base64)
and the answer a few dozen floats, at control rates of 10-50 Hz: on loopback a keep-alive HTTP round trip
costs well under a millisecond of the ~2 ms onnxruntime step (bench/policy_latency.py measures it). HTTP
also gives status codes for free (400 bad request, 503 busy, 504 timeout), works from curl and any
language's standard library, and a robot needs no client package at all.

Serving: each HTTP connection has a thread that checks its request and puts it on a bounded queue; one
batcher thread takes up to max_batch rows, waiting at most max_wait_ms for more after the first (and not at
all when no other request is being read: an idle server adds no delay), runs the backend once, and answers
each request with its own rows. A full queue answers 503 "busy" at once (memory
stays bounded under overload); a bad request answers 400 with one line and never reaches the backend; a
backend error answers 500 and the server goes on. stop() (and SIGINT / SIGTERM under the CLI) refuses new
requests, answers every queued one, then closes. GET /stats: latency p50 / p99 and throughput.
"""
from __future__ import annotations

import json
import queue
import threading
import time
from collections import deque
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np

from ..config import ConfigError, UserError, parse_command
from .protocol import BadRequest, parse_act_request
from .runtime import BACKENDS


@dataclass
class ServeConfig:
    model: str = ""             # policy.onnx (onnxruntime), policy.engine (tensorrt), or ckpt.pt / run dir (torch)
    backend: str = "auto"       # auto (by the model's file) | onnxruntime | tensorrt | torch | torch_compiled
    host: str = "127.0.0.1"     # 0.0.0.0 to serve other machines (no authentication: a trusted network only)
    port: int = 8000            # 0: any free port (printed)
    max_batch: int = 8          # rows per backend call, summed over the requests batched together
    max_wait_ms: float = 2.0    # after a batch's first request, how long to wait for more
    queue_size: int = 64        # requests waiting for the backend; beyond it: 503 busy
    max_body_kb: int = 4096     # larger request bodies: 413
    timeout_s: float = 30.0     # a request not answered in this time: 504
    image_size: int = 64        # torch backends: the frames' size (ONNX and TensorRT files carry their own)
    num_steps: int = 0          # torch backends: ODE steps K (0: the policy's own)
    device: str = "auto"        # torch backends: cpu | cuda | auto
    threads: int = 0            # onnxruntime: intra-op threads (0: its default)

    def validate(self) -> None:
        if not self.model:
            raise ConfigError("serve needs model=<policy.onnx | policy.engine | ckpt.pt> (vla-rft export writes one)")
        if self.backend not in ("auto", *BACKENDS):
            raise ConfigError(f"backend must be auto or one of {', '.join(BACKENDS)}; got {self.backend!r}")
        if not 0 <= self.port <= 65535:
            raise ConfigError(f"port must be 0..65535; got {self.port}")
        if min(self.max_batch, self.queue_size, self.max_body_kb, self.image_size) < 1 or self.max_wait_ms < 0 \
                or self.timeout_s <= 0:
            raise ConfigError("max_batch, queue_size, max_body_kb, image_size must be >= 1, max_wait_ms >= 0, "
                              "timeout_s > 0")


class _Item:
    __slots__ = ("req", "t0", "done", "actions", "error", "batch_rows")

    def __init__(self, req, t0: float):
        self.req, self.t0, self.done = req, t0, threading.Event()
        self.actions: np.ndarray | None = None
        self.error: str | None = None
        self.batch_rows = 0


class _Stats:
    """Counters and a window of the latest latencies (bounded memory); thread-safe."""

    def __init__(self, window: int = 10000):
        self.lock, self.t_start = threading.Lock(), time.perf_counter()
        self.lat: deque[float] = deque(maxlen=window)
        self.t_done: deque[float] = deque(maxlen=window)
        self.rows: deque[int] = deque(maxlen=window)
        self.n = dict.fromkeys(("ok", "rows", "batches", "bad_request", "busy", "timeout", "error"), 0)

    def count(self, key: str, k: int = 1) -> None:
        with self.lock:
            self.n[key] += k

    def answered(self, items: list[_Item], rows: int) -> None:
        now = time.perf_counter()
        with self.lock:
            self.n["batches"] += 1
            self.rows.append(rows)
            for it in items:
                self.lat.append(now - it.t0)
                self.t_done.append(now)

    def snapshot(self) -> dict:
        with self.lock:
            lat = np.array(self.lat) * 1e3
            span = self.t_done[-1] - self.t_done[0] if len(self.t_done) > 1 else 0.0
            out = {"requests": dict(self.n), "uptime_s": round(time.perf_counter() - self.t_start, 3),
                   "window": len(lat), "mean_batch_rows": float(np.mean(self.rows)) if self.rows else 0.0,
                   "throughput_rps": (len(self.t_done) - 1) / span if span > 0 else 0.0}
        out["latency_ms"] = ({k: float(np.percentile(lat, q)) for k, q in (("p50", 50), ("p90", 90), ("p99", 99))}
                             | {"max": float(lat.max())}) if len(lat) else {}
        return out


class PolicyServer:
    """`runtime` (runtime.PolicyRuntime or anything with .meta, .encode_instructions, __call__ and warmup) behind
    HTTP on host:port. start() returns once the backend is warm and the socket listens; stop() is graceful."""

    def __init__(self, runtime, host: str = "127.0.0.1", port: int = 0, max_batch: int = 8, max_wait_ms: float = 2.0,
                 queue_size: int = 64, max_body_kb: int = 4096, timeout_s: float = 30.0):
        self.runtime, self.meta = runtime, runtime.meta
        self.max_batch = min(max_batch, runtime.meta.max_batch)
        self.max_wait, self.timeout_s, self.max_body = max_wait_ms / 1e3, timeout_s, max_body_kb * 1024
        self.q: queue.Queue = queue.Queue(maxsize=queue_size)
        self.stats = _Stats()
        self._admit = threading.Lock()  # "not stopping" and "put" happen together, so stop() can drain everything
        self._stopping, self._ready = threading.Event(), threading.Event()
        self._rng = np.random.default_rng()
        self._arriving, self._arriving_lock = 0, threading.Lock()  # requests being read, not yet queued
        self._failed: BaseException | None = None
        self.httpd = ThreadingHTTPServer((host, port), _Handler)
        self.httpd.daemon_threads = True
        self.httpd.policy_server = self  # type: ignore[attr-defined]
        self._threads: list[threading.Thread] = []

    @property
    def url(self) -> str:
        host, port = self.httpd.socket.getsockname()[:2]
        return f"http://{host}:{port}"

    def start(self) -> "PolicyServer":
        worker = threading.Thread(target=self._batch_loop, name="vla-rft-batcher", daemon=True)
        worker.start()
        self._ready.wait()
        if self._failed is not None:
            self.httpd.server_close()
            raise self._failed
        http = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.1}, name="vla-rft-http",
                                daemon=True)
        http.start()
        self._threads = [worker, http]
        return self

    def stop(self, timeout: float = 30.0) -> None:
        """Refuse new requests (503), answer the queued ones, stop the batcher, close the socket."""
        with self._admit:
            self._stopping.set()
        if self._threads:
            self._threads[0].join(timeout)
            self.httpd.shutdown()
            self._threads[1].join(timeout)
            self._threads = []
        self.httpd.server_close()

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()

    # ---- the batcher thread --------------------------------------------------------------------------------
    def _batch_loop(self) -> None:
        try:  # warm-up in this thread: the one that runs the backend (compiled / CUDA-graph code stays on it)
            self.runtime.warmup(self.max_batch)
        except BaseException as e:  # noqa: BLE001 -- handed to start(), which raises it in the caller
            self._failed = e
        self._ready.set()
        if self._failed is not None:
            return
        carry = None
        while True:
            if carry is None:
                try:
                    carry = self.q.get(timeout=0.05)
                except queue.Empty:
                    if self._stopping.is_set():
                        return  # admission is closed and the queue is empty: nothing can arrive any more
                    continue
            batch, rows = [carry], carry.req.rows
            carry, deadline = None, time.perf_counter() + self.max_wait
            while rows < self.max_batch:
                if self._arriving == 0 and self.q.empty():
                    break  # nothing else is on its way: waiting would only add latency
                try:
                    nxt = self.q.get(timeout=max(0.0, deadline - time.perf_counter()))
                except queue.Empty:
                    break
                if rows + nxt.req.rows > self.max_batch:
                    carry = nxt  # starts the next batch
                    break
                batch.append(nxt)
                rows += nxt.req.rows
            self._run(batch, rows)

    def _run(self, batch: list[_Item], rows: int) -> None:
        reqs = [it.req for it in batch]
        L = max(r.ids.shape[1] for r in reqs)
        ids = np.concatenate([np.pad(r.ids, ((0, 0), (0, L - r.ids.shape[1])), constant_values=-1) for r in reqs])
        chunk = (self.meta.chunk_len, self.meta.action_dim)
        noise = np.concatenate([r.noise if r.noise is not None else
                                (self._rng if r.seed is None else np.random.default_rng(r.seed)).standard_normal(
                                    (r.rows, *chunk), dtype=np.float32) for r in reqs])
        try:
            out = self.runtime(np.concatenate([r.image for r in reqs]), ids, np.concatenate([r.proprio for r in reqs]),
                               noise)
            i = 0
            for it in batch:
                it.actions, it.batch_rows = out[i:i + it.req.rows], rows
                i += it.req.rows
            self.stats.answered(batch, rows)
        except Exception as e:  # noqa: BLE001 -- one failing batch must not end the server
            for it in batch:
                it.error = f"the {self.meta.backend} backend failed: {' '.join(str(e).split()) or type(e).__name__}"
        for it in batch:
            it.done.set()

    # ---- called by the HTTP handler threads ----------------------------------------------------------------
    def arriving(self, k: int) -> None:
        with self._arriving_lock:
            self._arriving += k

    def act(self, payload, t0: float, queued=lambda: None) -> tuple[int, dict]:
        """Check, queue (then call `queued`), wait for the batcher: -> (HTTP status, JSON answer)."""
        try:
            req = parse_act_request(payload, self.meta, self.max_batch, self.runtime.encode_instructions)
        except BadRequest as e:
            self.stats.count("bad_request")
            return e.status, {"error": str(e)}
        item = _Item(req, t0)
        with self._admit:
            queued()  # from here on the queue itself tells the batcher that this request is there
            if self._stopping.is_set():
                return 503, {"error": "shutting down"}
            try:
                self.q.put_nowait(item)
            except queue.Full:
                self.stats.count("busy")
                return 503, {"error": f"busy: {self.q.maxsize} requests already queued (queue_size); retry later"}
        if not item.done.wait(self.timeout_s):
            self.stats.count("timeout")
            return 504, {"error": f"no answer within timeout_s={self.timeout_s:g} s"}
        if item.error is not None:
            self.stats.count("error")
            return 500, {"error": item.error}
        self.stats.count("ok")
        self.stats.count("rows", req.rows)
        acts = item.actions
        assert acts is not None  # set with done, unless error is
        acts = acts[0] if req.single else acts
        return 200, {"actions": acts.tolist(), "model_id": self.meta.model_id, "backend": self.meta.backend,
                     "latency_ms": (time.perf_counter() - t0) * 1e3, "batch_rows": item.batch_rows, "id": req.id}

    def health(self) -> dict:
        return {"status": "stopping" if self._stopping.is_set() else "ok", "model_id": self.meta.model_id,
                "backend": self.meta.backend, "max_batch": self.max_batch, "meta": self.meta.to_dict()}


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive: a robot's requests reuse one connection
    server_version = "vla-rft-serve"
    timeout = 120  # an idle connection's thread ends after this
    disable_nagle_algorithm = True  # headers and body are two writes: Nagle + delayed ACK would add ~40 ms

    def log_message(self, format, *args):  # noqa: A002 -- one line per request would flood the console
        pass

    def _send(self, status: int, obj: dict, close: bool = False) -> None:
        body = json.dumps(obj).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        if status == 503:
            self.send_header("Retry-After", "1")
        if close:  # the body was not read: the connection cannot carry another request
            self.send_header("Connection", "close")
            self.close_connection = True
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self):
        ps = getattr(self.server, "policy_server")
        if self.path == "/health":
            self._send(200, ps.health())
        elif self.path == "/stats":
            self._send(200, ps.stats.snapshot())
        else:
            self._send(404, {"error": f"no such path {self.path}; GET /health, GET /stats, POST /act"})

    def do_POST(self):
        t0 = time.perf_counter()
        ps = getattr(self.server, "policy_server")
        ps.arriving(1)  # the batcher waits for requests still being read (max_wait_ms at most)
        left = [True]

        def queued():
            if left[0]:
                left[0] = False
                ps.arriving(-1)
        try:
            self._post(ps, t0, queued)
        finally:
            queued()

    def _post(self, ps: PolicyServer, t0: float, queued) -> None:
        if self.path != "/act":
            return self._send(404, {"error": f"no such path {self.path}; POST /act"}, close=True)
        size = self.headers.get("Content-Length")
        if size is None or not size.isdigit():
            ps.stats.count("bad_request")
            return self._send(411, {"error": "a Content-Length header (a byte count) is required"}, close=True)
        if int(size) > ps.max_body:
            ps.stats.count("bad_request")
            return self._send(413, {"error": f"body of {int(size)} bytes exceeds max_body_kb={ps.max_body // 1024}"},
                              close=True)
        raw = self.rfile.read(int(size))
        try:
            payload = json.loads(raw)
        except (ValueError, UnicodeDecodeError) as e:
            ps.stats.count("bad_request")
            return self._send(400, {"error": f"the body is not JSON: {e}"})
        try:
            status, obj = ps.act(payload, t0, queued)
        except Exception as e:  # noqa: BLE001 -- a bug in one request's handling must not end the server
            ps.stats.count("error")
            status, obj = 500, {"error": f"internal error: {type(e).__name__}: {' '.join(str(e).split())}"}
        self._send(status, obj)


def main(argv: list[str]) -> int:
    cfg = parse_command("serve", ServeConfig, argv)
    if cfg is None:
        return 0
    cfg.validate()
    import signal

    from .runtime import backend_available, load_runtime, resolve_backend
    backend = resolve_backend(cfg.model, cfg.backend)
    ok, why = backend_available(backend)
    if not ok:
        raise UserError(f"backend={backend}: {why}")
    try:
        rt = load_runtime(cfg.model, backend, image_size=cfg.image_size, num_steps=cfg.num_steps, device=cfg.device,
                          max_batch=cfg.max_batch, threads=cfg.threads)
    except (UserError, FileNotFoundError, ValueError):
        raise
    except Exception as e:  # onnxruntime / TensorRT / torch loaders raise their own types for an unreadable file
        raise UserError(f"cannot load {cfg.model} with backend={backend}: {' '.join(str(e).split())[:300]}") from e
    try:
        server = PolicyServer(rt, cfg.host, cfg.port, cfg.max_batch, cfg.max_wait_ms, cfg.queue_size, cfg.max_body_kb,
                              cfg.timeout_s)
    except OSError as e:
        raise UserError(f"cannot listen on {cfg.host}:{cfg.port}: {e.strerror or e}") from None
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    server.start()
    m = rt.meta
    print(f"serve: {server.url} ({m.backend}, model {m.model_id}, image {m.image_size[0]}x{m.image_size[1]}, "
          f"chunk {m.chunk_len}x{m.action_dim}, max_batch {server.max_batch}); POST /act, GET /stats; "
          "Ctrl-C stops", flush=True)
    while not stop.wait(0.5):
        pass
    server.stop()
    s = server.stats.snapshot()
    lat = s["latency_ms"]
    print(f"serve: stopped after {s['requests']['ok']} requests" +
          (f", latency p50 {lat['p50']:.2f} ms, p99 {lat['p99']:.2f} ms" if lat else ""), flush=True)
    return 0
