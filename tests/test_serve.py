"""`vla-rft serve` / `client` on loopback: served actions equal policy.act, concurrent clients each get their own
answer, malformed requests get one-line errors, a full queue answers busy, shutdown is graceful."""
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
import torch

from vla_rft_engine.export.client import PolicyClient, ServerError
from vla_rft_engine.export.onnx_export import DeployedPolicy, export_onnx
from vla_rft_engine.export.protocol import encode_array
from vla_rft_engine.export.runtime import PolicyMeta, hash_tokens_np, load_runtime
from vla_rft_engine.export.serve import PolicyServer
from vla_rft_engine.export.torch_runtime import TorchPolicyRuntime
from vla_rft_engine.models.encoders import hash_tokens
from vla_rft_engine.models.policy import PolicyConfig, VLAPolicy

pytest.importorskip("onnxruntime", reason="needs onnxruntime (pip install '.[onnx]')")
pytest.importorskip("onnxscript", reason="torch's ONNX exporter needs onnxscript (pip install '.[onnx]')")

IMG, T, A, P = 32, 4, 7, 8


@pytest.fixture(scope="module")
def policy_and_onnx(tmp_path_factory):
    torch.manual_seed(0)
    pol = VLAPolicy(PolicyConfig(d_model=32, depth=1, heads=2, z_dim=32, enc_channels=8, sigma_d_model=16,
                                 sigma_depth=1, chunk_len=T)).eval()
    pol.set_norm_stats(torch.randn(50, A) * 0.3, torch.randn(50, P))
    return pol, export_onnx(pol, tmp_path_factory.mktemp("serve") / "policy.onnx", image_size=IMG)


@pytest.fixture(scope="module")
def server(policy_and_onnx):
    srv = PolicyServer(load_runtime(policy_and_onnx[1]), max_batch=8, max_wait_ms=2, queue_size=64,
                       max_body_kb=256).start()
    yield srv
    srv.stop()


def observation(seed: int, batch: int = 0):
    g = torch.Generator().manual_seed(seed)
    shape = (batch,) if batch else (1,)
    img = torch.randint(0, 256, (*shape, IMG, IMG, 3), dtype=torch.uint8, generator=g)
    prop = torch.randn(*shape, P, generator=g)
    return img, prop


def test_served_actions_equal_policy_act(policy_and_onnx, server):
    """onnxruntime and torch backends, one frame and a batch: the answer is policy.act's for the same noise."""
    pol, _ = policy_and_onnx
    torch_srv = PolicyServer(TorchPolicyRuntime(pol, image_size=IMG), max_batch=8).start()
    try:
        for srv, tol in ((server, 1e-4), (torch_srv, 1e-5)):
            c = PolicyClient(srv.url)
            for batch, words in ((0, "pick up the red block"), (3, ["reach the red zone", "push", "put it down"])):
                img, prop = observation(11 + batch, batch)
                n = max(batch, 1)
                act = pol.act(img, words if batch else [words], prop, generator=torch.Generator().manual_seed(5))
                noise = torch.randn(n, T, A, generator=torch.Generator().manual_seed(5))
                out = c.act(img.numpy() if batch else img[0].numpy(), words, prop.numpy() if batch else prop[0].numpy(),
                            noise=noise.numpy() if batch else noise[0].numpy())
                assert out["actions"].shape == ((batch, T, A) if batch else (T, A))
                np.testing.assert_allclose(out["actions"].reshape(n, T, A), act.numpy(), atol=tol, rtol=0)
                assert out["model_id"] == srv.meta.model_id and out["latency_ms"] > 0
            # a seed instead of noise: reproducible, and the same draw as the runtime's own
            img, prop = observation(3)
            a1 = c.act(img[0].numpy(), "pick", prop[0].numpy(), seed=9)["actions"]
            a2 = c.act(img[0].numpy(), "pick", prop[0].numpy(), seed=9)["actions"]
            ids = hash_tokens(["pick"], 1024)
            noise = np.random.default_rng(9).standard_normal((1, T, A), dtype=np.float32)
            with torch.no_grad():
                ref = DeployedPolicy(pol)(img, ids, prop, torch.from_numpy(noise))[0].numpy()
            np.testing.assert_array_equal(a1, a2)
            np.testing.assert_allclose(a1, ref, atol=tol, rtol=0)
            # token ids instead of text: the same answer
            a3 = c.act(img[0].numpy(), ids[0].tolist(), prop[0].numpy(), seed=9, instruction_encoding="ids")["actions"]
            np.testing.assert_allclose(a3, a1, atol=1e-6, rtol=0)
            c.close()
    finally:
        torch_srv.stop()


def test_concurrent_clients_get_their_own_answers(server):
    """8 clients x 100 requests at once: every answer is the one for that client's own observation and noise."""
    rt, n_clients, n_req = server.runtime, 8, 100
    cases = []
    for k in range(n_clients):
        img, ids, prop, noise = rt.example(n_req, f"client {k} task", seed=100 + k)
        cases.append((img, prop, noise, rt(img, ids, prop, noise)))
    refs = np.stack([c[3] for c in cases])
    assert np.abs(refs[0] - refs[1]).max() > 1e-2  # answers differ between clients: a mix-up would show
    failures, errors = [], []

    def client(k):
        img, prop, noise, ref = cases[k]
        c = PolicyClient(server.url)
        try:
            for i in range(n_req):
                out = c.act(img[i], f"client {k} task", prop[i], noise=noise[i], id=f"{k}-{i}")
                if out["id"] != f"{k}-{i}" or not np.allclose(out["actions"], ref[i], atol=1e-4, rtol=0):
                    failures.append((k, i))
        except Exception as e:  # noqa: BLE001 -- reported below
            errors.append(f"client {k}: {e}")
        finally:
            c.close()

    before = server.stats.snapshot()["requests"]
    t0 = time.perf_counter()
    threads = [threading.Thread(target=client, args=(k,)) for k in range(n_clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    wall = time.perf_counter() - t0
    assert not errors and not failures, (errors[:3], failures[:5])
    s = server.stats.snapshot()
    assert s["requests"]["ok"] - before["ok"] == n_clients * n_req
    assert s["requests"]["batches"] - before["batches"] < n_clients * n_req  # requests were batched together
    assert s["mean_batch_rows"] > 1 and s["latency_ms"]["p99"] >= s["latency_ms"]["p50"] > 0
    print(f"{n_clients * n_req} requests in {wall:.2f} s; server stats {s}")


def _raw(url: str, data: bytes) -> tuple[int, dict]:
    """Send bytes as they are (headers included) and read the status line and JSON body."""
    host, port = url.rsplit("/", 1)[-1].split(":")
    with socket.create_connection((host, int(port)), timeout=10) as s:
        s.sendall(data)
        resp = b""
        while chunk := s.recv(65536):
            resp += chunk
    head, body = resp.split(b"\r\n\r\n", 1)
    return int(head.split()[1]), json.loads(body)


def test_malformed_requests_get_clear_errors(server):
    c = PolicyClient(server.url)
    img, prop = (x[0].numpy() for x in observation(1))
    good = {"image": encode_array(img), "instruction": "pick", "proprio": prop.tolist()}
    nan_prop = prop.copy()
    nan_prop[2] = np.nan
    cases = [
        ({**good, "image": encode_array(img[:16])}, 400, "image must be uint8 (32, 32, 3)"),
        ({**good, "image": encode_array(img.astype(np.float32))}, 400, "image must be uint8"),
        ({**good, "image": encode_array(img.astype(np.int64))}, 400, "image dtype must be uint8"),
        ({**good, "image": (img.astype(np.float32) / 255).tolist()}, 400, "image must be uint8"),
        ({k: v for k, v in good.items() if k != "proprio"}, 400, "missing field(s) proprio"),
        ({**good, "proprio": nan_prop.tolist()}, 400, "proprio holds NaN or Inf (1 of 8 values)"),
        ({**good, "proprio": encode_array(nan_prop)}, 400, "proprio holds NaN"),
        ({**good, "proprio": prop[:3].tolist()}, 400, "proprio must have shape (8,)"),
        ({**good, "instruction_encoding": "utf-16"}, 400, "unknown instruction_encoding 'utf-16'"),
        ({**good, "instruction_encoding": "ids", "instruction": "pick"}, 400, "must be a non-empty list of ints"),
        ({**good, "instruction_encoding": "ids", "instruction": [1, 5000]}, 400, "must lie in [0, 1024)"),
        ({**good, "instruction": " ".join(["w"] * 65)}, 400, "65 words; the policy takes at most 64"),
        ({**good, "instruction": 7}, 400, "instruction must be a string"),
        ({**good, "imgae": 1}, 400, "unknown field(s) imgae"),
        ({**good, "image": [[1, 2], [3]]}, 400, "ragged"),
        ({**good, "image": {"dtype": "uint8", "shape": [32, 32, 3], "b64": "!!"}}, 400, "not valid base64"),
        ({**good, "image": {"dtype": "uint8", "shape": [32, 32, 3], "b64": "AAAA"}}, 400, "3 bytes for uint8"),
        ({**good, "seed": -1}, 400, "seed must be a non-negative integer"),
        ({**good, "noise": np.zeros((T + 1, A)).tolist()}, 400, "noise must have shape (4, 7)"),
        ({**good, "image": encode_array(np.zeros((9, IMG, IMG, 3), np.uint8)), "proprio": np.zeros((9, P)).tolist()},
         400, "1 to 8 frames"),
        ([1, 2], 400, "body must be a JSON object"),
    ]
    for payload, status, msg in cases:
        st, obj = c.request("POST", "/act", json.dumps(payload).encode())
        assert st == status and msg in obj["error"] and "\n" not in obj["error"], (msg, st, obj)
    st, obj = c.request("POST", "/act", b"{not json")
    assert st == 400 and "not JSON" in obj["error"]
    st, obj = c.request("GET", "/nope")
    assert st == 404
    # oversized: refused from the header alone (the 1 GB body is never sent, let alone read)
    st, obj = _raw(server.url, b"POST /act HTTP/1.1\r\nHost: x\r\nContent-Length: 1000000000\r\n\r\n")
    assert st == 413 and "exceeds max_body_kb=256" in obj["error"]
    st, obj = _raw(server.url, b"POST /act HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    assert st == 411
    # still serving, on the same connection too
    assert c.act(img, "pick", prop, seed=1)["actions"].shape == (T, A)
    assert server.stats.snapshot()["requests"]["bad_request"] >= len(cases) + 3
    c.close()


class SlowStub:
    """A backend that takes `delay` s per call (only for the queue / shutdown tests; parity uses the real model)."""

    def __init__(self, delay: float, fail_on: int = -1):
        self.meta = PolicyMeta(image_size=(IMG, IMG), chunk_len=T, action_dim=A, proprio_dim=P, model_id="stub",
                               backend="stub")
        self.delay, self.calls, self.fail_on = delay, 0, fail_on

    def encode_instructions(self, texts):
        return hash_tokens_np(texts, 1024)

    def warmup(self, max_batch=1):
        pass

    def __call__(self, image, ids, proprio, noise):
        self.calls += 1
        if self.calls == self.fail_on:
            raise RuntimeError("stub failure\nsecond line")
        time.sleep(self.delay)
        return np.repeat(proprio[:, None, :A], T, 1)


def _post_many(url: str, n: int) -> list:
    img, prop = (x[0].numpy() for x in observation(2))
    out = [None] * n

    def one(i):
        c = PolicyClient(url)
        try:
            out[i] = (200, c.act(img, "go", prop + i, seed=i))
        except ServerError as e:
            out[i] = (e.status, e.message)
        finally:
            c.close()
    threads = [threading.Thread(target=one, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
        time.sleep(0.01)
    for t in threads:
        t.join(30)
    return out


def test_full_queue_answers_busy_and_recovers():
    stub = SlowStub(0.3)
    with PolicyServer(stub, max_batch=1, queue_size=1, max_wait_ms=0) as srv:
        res = _post_many(srv.url, 6)  # 1 running + 1 queued; the rest find the queue full
        busy = [r for r in res if r[0] == 503]
        ok = [r for r in res if r[0] == 200]
        assert busy and ok and len(busy) + len(ok) == 6
        assert all("busy" in msg for _, msg in busy)
        assert srv.stats.snapshot()["requests"]["busy"] == len(busy)
        for _, ans in ok:  # each answered request got its own rows (the stub echoes proprio)
            assert ans["actions"].shape == (T, A)
        img, prop = (x[0].numpy() for x in observation(2))
        assert PolicyClient(srv.url).act(img, "go", prop)["batch_rows"] == 1  # recovered


def test_backend_failure_is_a_500_and_the_server_goes_on():
    with PolicyServer(SlowStub(0.0, fail_on=1)) as srv:
        c = PolicyClient(srv.url)
        img, prop = (x[0].numpy() for x in observation(2))
        with pytest.raises(ServerError) as e:
            c.act(img, "go", prop)
        assert e.value.status == 500 and "stub failure second line" in e.value.message
        np.testing.assert_allclose(c.act(img, "go", prop)["actions"][0], prop[:A], atol=1e-6)


def test_stop_answers_queued_requests_then_refuses():
    stub = SlowStub(0.25)
    srv = PolicyServer(stub, max_batch=1, queue_size=8).start()
    results = []
    t = threading.Thread(target=lambda: results.extend(_post_many(srv.url, 3)))
    t.start()
    while srv.q.qsize() < 2:  # 1 running, 2 queued
        time.sleep(0.01)
    stopper = threading.Thread(target=srv.stop)
    stopper.start()
    while not srv._stopping.is_set():
        time.sleep(0.005)
    img, prop = (x[0].numpy() for x in observation(2))
    with pytest.raises(ServerError) as e:  # arriving during the drain: refused, not queued
        PolicyClient(srv.url).act(img, "go", prop)
    assert e.value.status == 503 and "shutting down" in e.value.message
    t.join(30)
    stopper.join(30)
    assert [r[0] for r in results] == [200, 200, 200]  # everything queued before stop() was answered
    with pytest.raises(OSError):
        PolicyClient(srv.url, timeout=2).health()


def test_cli_serve_without_torch_sigterm_and_client(policy_and_onnx, capsys):
    """`vla-rft serve` on onnxruntime in a process where torch cannot be imported; `vla-rft client` against it;
    SIGTERM stops it cleanly."""
    code = ("import sys; sys.modules['torch'] = None\n"
            "from vla_rft_engine.cli import main; sys.exit(main())")
    p = subprocess.Popen([sys.executable, "-c", code, "serve", f"model={policy_and_onnx[1]}", "port=0"],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env={**os.environ})
    try:
        line = p.stdout.readline()
        assert line.startswith("serve: http://127.0.0.1:"), line + p.stderr.read()
        url = line.split()[1]
        from vla_rft_engine.cli import main as cli
        assert cli(["client", f"url={url}", "requests=5", "concurrency=2"]) == 0
        out = capsys.readouterr().out
        assert "10/10 requests answered" in out and "server latency p50" in out
        p.send_signal(signal.SIGTERM)
        rest, err = p.communicate(timeout=30)
    finally:
        if p.poll() is None:
            p.kill()
    assert p.returncode == 0, err
    assert "serve: stopped after 10 requests" in rest


def test_cli_errors_are_one_line(tmp_path, capsys):
    from vla_rft_engine.cli import main as cli
    assert cli(["serve"]) == 2
    assert "serve needs model=" in capsys.readouterr().err
    assert cli(["serve", "model=x.onnx", "backend=triton"]) == 2
    assert "backend must be auto or one of" in capsys.readouterr().err
    assert cli(["serve", f"model={tmp_path / 'missing.onnx'}"]) == 2
    assert "not found" in capsys.readouterr().err
    (tmp_path / "bad.onnx").write_bytes(b"not a model")
    assert cli(["serve", f"model={tmp_path / 'bad.onnx'}"]) == 2
    assert "cannot load" in capsys.readouterr().err
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    assert cli(["client", f"url=http://127.0.0.1:{port}"]) == 2
    err = capsys.readouterr().err
    assert "no server at" in err and len(err.strip().splitlines()) == 1
