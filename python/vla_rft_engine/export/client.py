"""`vla-rft client`: a smoke test of a running `vla-rft serve`, and PolicyClient, the robot side (no torch).

    vla-rft client url=http://127.0.0.1:8000 requests=50 concurrency=4

    c = PolicyClient("http://127.0.0.1:8000")
    out = c.act(frame, "pick up the red block", proprio)       # frame uint8 (H, W, 3), proprio (P,)
    out["actions"]                                             # float32 (T, A), raw units; model_id, latency_ms
"""
from __future__ import annotations

import http.client
import json
import statistics
import threading
import time
import urllib.parse
from dataclasses import dataclass

import numpy as np

from ..config import ConfigError, UserError, parse_command
from .protocol import encode_array


class ServerError(RuntimeError):
    """The server answered with an error: `status` (400 bad request, 503 busy, ...) and its one-line message."""

    def __init__(self, status: int, message: str):
        super().__init__(f"HTTP {status}: {message}")
        self.status, self.message = status, message


class PolicyClient:
    """One keep-alive HTTP connection to a policy server; not thread-safe (one client per thread)."""

    def __init__(self, url: str = "http://127.0.0.1:8000", timeout: float = 30.0):
        u = urllib.parse.urlsplit(url if "//" in url else f"http://{url}")
        if u.scheme != "http" or not u.hostname:
            raise ValueError(f"url must look like http://HOST:PORT; got {url!r}")
        self.conn = http.client.HTTPConnection(u.hostname, u.port or 80, timeout=timeout)

    def request(self, method: str, path: str, body: bytes | None = None, headers: dict | None = None) -> tuple[int, dict]:
        """-> (HTTP status, decoded JSON answer)."""
        hdrs = {"Content-Type": "application/json", **(headers or {})} if body is not None else dict(headers or {})
        for attempt in (0, 1):
            try:
                self.conn.request(method, path, body=body, headers=hdrs)
                resp = self.conn.getresponse()
                data = resp.read()
                break
            except (ConnectionResetError, BrokenPipeError, http.client.RemoteDisconnected):
                # the server closed a kept-alive connection: reconnect once (acting has no server-side state)
                self.conn.close()
                if attempt:
                    raise
        if resp.getheader("Connection", "").lower() == "close":
            self.conn.close()
        try:
            return resp.status, json.loads(data)
        except ValueError:
            return resp.status, {"error": data[:200].decode("utf-8", "replace")}

    def act(self, image, instruction, proprio, noise=None, seed: int | None = None, id=None, **extra) -> dict:
        """One observation (image (H, W, 3)) or a batch ((B, H, W, 3)); instruction text or token ids (then
        pass instruction_encoding="ids"). Returns the answer with "actions" as a float32 array."""
        payload = {"image": encode_array(np.asarray(image, dtype=np.uint8)), "instruction": instruction,
                   "proprio": encode_array(np.asarray(proprio, dtype=np.float32)), **extra}
        if noise is not None:
            payload["noise"] = encode_array(np.asarray(noise, dtype=np.float32))
        if seed is not None:
            payload["seed"] = int(seed)
        if id is not None:
            payload["id"] = id
        status, obj = self.request("POST", "/act", json.dumps(payload).encode())
        if status != 200:
            raise ServerError(status, obj.get("error", ""))
        obj["actions"] = np.asarray(obj["actions"], dtype=np.float32)
        return obj

    def health(self) -> dict:
        return self.request("GET", "/health")[1]

    def stats(self) -> dict:
        return self.request("GET", "/stats")[1]

    def close(self) -> None:
        self.conn.close()


@dataclass
class ClientConfig:
    url: str = "http://127.0.0.1:8000"        # the server (vla-rft serve prints it)
    requests: int = 20                        # per connection
    concurrency: int = 1                      # connections sending at once
    batch: int = 1                            # frames per request (1: one observation, answer (T, A))
    instruction: str = "pick up the red block"
    seed: int = 0                             # random frames and noise from this seed
    timeout_s: float = 30.0

    def validate(self) -> None:
        if min(self.requests, self.concurrency, self.batch) < 1 or self.timeout_s <= 0:
            raise ConfigError("requests, concurrency and batch must be >= 1, timeout_s > 0")


def main(argv: list[str]) -> int:
    cfg = parse_command("client", ClientConfig, argv)
    if cfg is None:
        return 0
    cfg.validate()
    try:
        health = PolicyClient(cfg.url, cfg.timeout_s).health()
    except OSError as e:
        raise UserError(f"no server at {cfg.url} ({e.strerror or e}); start one with vla-rft serve model=...") from None
    meta = health["meta"]
    (H, W), P, T, A = meta["image_size"], meta["proprio_dim"], meta["chunk_len"], meta["action_dim"]
    rtt, errors, lock = [], [], threading.Lock()

    def worker(k: int) -> None:
        c, rng = PolicyClient(cfg.url, cfg.timeout_s), np.random.default_rng(cfg.seed + k)
        shape = (cfg.batch,) if cfg.batch > 1 else ()
        for i in range(cfg.requests):
            img = rng.integers(0, 256, (*shape, H, W, 3), dtype=np.uint8)
            t0 = time.perf_counter()
            try:
                out = c.act(img, cfg.instruction, rng.standard_normal((*shape, P)), seed=cfg.seed + i, id=[k, i])
                assert out["actions"].shape == (*shape, T, A) and out["id"] == [k, i], "answer of the wrong shape or id"
                assert np.isfinite(out["actions"]).all(), "non-finite actions"
                with lock:
                    rtt.append(time.perf_counter() - t0)
            except (ServerError, AssertionError, OSError) as e:
                with lock:
                    errors.append(str(e))
        c.close()

    t0 = time.perf_counter()
    threads = [threading.Thread(target=worker, args=(k,)) for k in range(cfg.concurrency)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    n = cfg.requests * cfg.concurrency
    ms = sorted(x * 1e3 for x in rtt)
    print(f"client: {cfg.url} {health['backend']} model {health['model_id']}: {len(rtt)}/{n} requests answered "
          f"in {wall:.2f} s ({len(rtt) / wall:.1f} req/s), actions ({'%d, ' % cfg.batch if cfg.batch > 1 else ''}"
          f"{T}, {A})")
    if ms:
        print(f"client: round trip p50 {statistics.median(ms):.2f} ms, p99 {ms[min(len(ms) - 1, int(0.99 * len(ms)))]:.2f} ms")
    lat = PolicyClient(cfg.url, cfg.timeout_s).stats().get("latency_ms") or {}
    if lat:
        print(f"client: server latency p50 {lat['p50']:.2f} ms, p99 {lat['p99']:.2f} ms (GET /stats)")
    if errors:
        raise UserError(f"{len(errors)} of {n} requests failed; first: {errors[0]}")
    return 0
