"""The serve / client wire format (HTTP + JSON, see serve.py for why), and the checks on every request.

POST /act, a JSON object:
  image        uint8 (H, W, 3) or (B, H, W, 3): {"dtype": "uint8", "shape": [...], "b64": raw bytes, base64}
               (encode_array), or nested lists of integers 0..255
  instruction  text, or a list of B texts (instruction_encoding "text", the default), or token ids: a list of
               ints or B lists (instruction_encoding "ids"; what a policy with an HF encoder needs)
  proprio      (P,) or (B, P) numbers, raw robot state (an array object or lists)
  noise        optional (T, A) or (B, T, A): the ODE's starting noise (equal noise -> equal actions)
  seed         optional int: noise drawn from it (reproducible) when no noise is given
  id           optional, echoed back (a client can match answers to requests)
-> 200 {"actions": (T, A) or (B, T, A) lists, raw units, "model_id", "backend", "latency_ms" (server side:
   queue + batch + compute), "batch_rows" (rows in the batch it ran in), "id"}
-> 400 / 411 / 413 {"error": one line} bad request, 503 {"error": "busy ..."} queue full or shutting down,
   504 timed out, 500 the backend failed (the server goes on).
GET /health -> {"status", "model_id", "backend", "meta"};  GET /stats -> latency percentiles, throughput, counts.

Nothing here imports torch: the client side runs on the robot.
"""
from __future__ import annotations

import base64
import math
from dataclasses import dataclass

import numpy as np

REQUIRED = ("image", "instruction", "proprio")
FIELDS = (*REQUIRED, "noise", "seed", "id", "instruction_encoding")
ENCODINGS = ("text", "ids")
DTYPES = ("uint8", "int32", "int64", "float16", "float32", "float64")


class BadRequest(ValueError):
    """The request is malformed; the message (one line) goes back to the client with HTTP `status`."""

    def __init__(self, msg: str, status: int = 400):
        super().__init__(msg)
        self.status = status


def encode_array(a) -> dict:
    a = np.ascontiguousarray(a)
    return {"dtype": str(a.dtype), "shape": list(a.shape), "b64": base64.b64encode(a.tobytes()).decode("ascii")}


def decode_array(obj, name: str) -> np.ndarray:
    """An encode_array object or (nested) JSON lists -> ndarray; anything else is a BadRequest naming `name`."""
    if isinstance(obj, dict):
        if set(obj) != {"dtype", "shape", "b64"}:
            raise BadRequest(f"{name}: an array object has exactly the keys dtype, shape, b64; got {sorted(obj)}")
        dt, shape = obj["dtype"], obj["shape"]
        if dt not in DTYPES:
            raise BadRequest(f"{name}: dtype {dt!r} is not one of {', '.join(DTYPES)}")
        if not (isinstance(shape, list) and all(isinstance(d, int) and d >= 0 for d in shape)):
            raise BadRequest(f"{name}: shape must be a list of non-negative ints; got {shape!r}")
        try:
            raw = base64.b64decode(obj["b64"], validate=True)
        except (ValueError, TypeError):
            raise BadRequest(f"{name}: b64 is not valid base64") from None
        want = math.prod(shape) * np.dtype(dt).itemsize
        if len(raw) != want:
            raise BadRequest(f"{name}: {len(raw)} bytes for {dt} {tuple(shape)} (needs {want})")
        return np.frombuffer(raw, dtype=dt).reshape(shape)
    if isinstance(obj, (list, int, float)) and not isinstance(obj, bool):
        try:
            a = np.asarray(obj)
        except ValueError:
            raise BadRequest(f"{name}: ragged nested lists (rows of different lengths)") from None
        if a.dtype.kind not in "iuf" or a.size == 0:
            raise BadRequest(f"{name}: expected numbers; got {'an empty list' if a.size == 0 else a.dtype.name}")
        return a
    raise BadRequest(f"{name}: expected an array ({{dtype, shape, b64}} or nested lists); got {type(obj).__name__}")


@dataclass
class ActRequest:
    image: np.ndarray        # uint8 (B, H, W, 3)
    ids: np.ndarray          # int64 (B, L), -1 padded
    proprio: np.ndarray      # float32 (B, P)
    noise: np.ndarray | None  # float32 (B, T, A) or None (drawn from seed / the server's generator)
    seed: int | None
    single: bool             # the request sent one observation, not a batch: answer (T, A)
    id: object = None

    @property
    def rows(self) -> int:
        return self.image.shape[0]


def _finite(a: np.ndarray, name: str) -> np.ndarray:
    a = a.astype(np.float32)
    if not np.isfinite(a).all():
        raise BadRequest(f"{name} holds NaN or Inf ({int((~np.isfinite(a)).sum())} of {a.size} values)")
    return a


def _rows(a: np.ndarray, name: str, single: bool, B: int, tail: tuple) -> np.ndarray:
    want = tail if single else (B, *tail)
    if a.shape != want:
        raise BadRequest(f"{name} must have shape {want} (the image is {'one frame' if single else f'{B} frames'}); "
                         f"got {a.shape}")
    return a.reshape(B, *tail)


def parse_act_request(payload, meta, max_batch: int, encode_text) -> ActRequest:
    """Check a decoded JSON body against the policy's `meta` (runtime.PolicyMeta); `encode_text(list[str])` ->
    int64 ids. Every problem is a one-line BadRequest."""
    if not isinstance(payload, dict):
        raise BadRequest(f"the body must be a JSON object; got {type(payload).__name__}")
    unknown = sorted(set(payload) - set(FIELDS))
    if unknown:
        raise BadRequest(f"unknown field(s) {', '.join(unknown)}; fields: {', '.join(FIELDS)}")
    missing = [k for k in REQUIRED if k not in payload]
    if missing:
        raise BadRequest(f"missing field(s) {', '.join(missing)}; required: {', '.join(REQUIRED)}")
    H, W = meta.image_size
    image = decode_array(payload["image"], "image")
    if image.dtype != np.uint8:
        if image.dtype.kind not in "iu" or image.min() < 0 or image.max() > 255:
            raise BadRequest(f"image must be uint8 (0..255); got {image.dtype.name} values")
        if isinstance(payload["image"], dict):  # an explicit dtype must be uint8; plain lists are cast
            raise BadRequest(f"image dtype must be uint8; got {image.dtype.name}")
        image = image.astype(np.uint8)
    if image.ndim not in (3, 4) or image.shape[-3:] != (H, W, 3):
        raise BadRequest(f"image must be uint8 ({H}, {W}, 3) or (B, {H}, {W}, 3); got shape {image.shape}")
    single = image.ndim == 3
    image = image.reshape(-1, H, W, 3)
    B = image.shape[0]
    if not 1 <= B <= max_batch:
        raise BadRequest(f"a request holds 1 to {max_batch} frames (max_batch); got {B}")
    proprio = _rows(_finite(decode_array(payload["proprio"], "proprio"), "proprio"), "proprio", single, B,
                    (meta.proprio_dim,))
    noise = None
    if payload.get("noise") is not None:
        noise = _rows(_finite(decode_array(payload["noise"], "noise"), "noise"), "noise", single, B,
                      (meta.chunk_len, meta.action_dim))
    seed = payload.get("seed")
    if seed is not None and (not isinstance(seed, int) or isinstance(seed, bool) or seed < 0):
        raise BadRequest(f"seed must be a non-negative integer; got {seed!r}")
    ids = _instruction(payload["instruction"], payload.get("instruction_encoding", "text"), meta, B, encode_text)
    return ActRequest(image, ids, proprio, noise, seed, single, payload.get("id"))


def _instruction(instr, encoding, meta, B: int, encode_text) -> np.ndarray:
    if encoding not in ENCODINGS:
        raise BadRequest(f"unknown instruction_encoding {encoding!r}; one of {', '.join(ENCODINGS)}")
    if encoding == "text":
        if meta.instruction_encoding != "hash_words":
            raise BadRequest(f"this policy takes token ids (its encoder's tokenizer): send instruction_encoding=ids, "
                             f"not text (policy encoding {meta.instruction_encoding})")
        texts = [instr] * B if isinstance(instr, str) else instr
        if not (isinstance(texts, list) and len(texts) == B and all(isinstance(t, str) for t in texts)):
            raise BadRequest(f"instruction must be a string or a list of {B} strings (one per frame)")
        ids = encode_text(texts)
    else:
        rows = instr if isinstance(instr, list) and instr and isinstance(instr[0], list) else [instr] * B
        ok = isinstance(rows, list) and len(rows) == B and all(
            isinstance(r, list) and r and all(isinstance(i, int) and not isinstance(i, bool) for i in r) for r in rows)
        if not ok:
            raise BadRequest(f"instruction_encoding=ids: instruction must be a non-empty list of ints or {B} such lists")
        L = max(len(r) for r in rows)
        try:
            ids = np.array([r + [-1] * (L - len(r)) for r in rows], dtype=np.int64)
        except OverflowError:
            raise BadRequest("instruction ids must fit in int64") from None
        hi = meta.vocab_buckets if meta.vocab_buckets > 0 else np.iinfo(np.int64).max
        if ids.min() < -1 or ids.max() >= hi:
            raise BadRequest(f"instruction ids must lie in [0, {hi}) (-1 pads); got {int(ids.min())}..{int(ids.max())}")
    if ids.shape[1] > meta.max_words:
        raise BadRequest(f"the instruction has {ids.shape[1]} words; the policy takes at most {meta.max_words}")
    return ids
