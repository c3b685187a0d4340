"""LPIPS (Zhang et al. 2018, v0.1) in the engine, batched over many frame pairs for the verified reward.

    d(x, y) = sum_l mean_hw( w_l . (n(f_l(x)) - n(f_l(y)))^2 ),   n(f) = f / (||f||_channels + 1e-10)

f_l are ReLU taps of an ImageNet AlexNet (relu1..relu5) or VGG16 (relu1_2, relu2_2, relu3_3, relu4_3,
relu5_3) applied after a fixed input scaling (x - shift) / scale; w_l are the learned 1x1 linear heads.
Because the head is linear and the spatial mean is linear, we average the squared difference per channel
first and dot with w_l afterwards (same value, far less memory traffic).

Inputs: float frames (..., 3, H, W) in [-1, 1] as in the `lpips` package, or in [0, 1] with zero_one=True.
Values outside the documented range raise ValueError (a [0, 255] frame would otherwise score silently wrong).
`y` may broadcast against `x` over the leading dims, e.g. x (S, N, T, 3, H, W) vs y (S, 1, T, 3, H, W): the
shared reference rollout's features are then computed once per start state instead of N times.

Weights (never downloaded): torchvision's backbone file (alexnet-owt-7be5be79.pth / vgg16-397923af.pth) in
$TORCH_HOME/hub/checkpoints (torch.hub.get_dir()) or a given path, and the linear heads shipped in the
installed `lpips` package (lpips/weights/v0.1/{alex,vgg}.pth) or a given path.
GPU: channels-last memory format and bf16 autocast for the backbone; normalisation and distances in fp32.
"""
from __future__ import annotations

import contextlib
import importlib.util
from pathlib import Path
from typing import cast

import torch
import torch.nn as nn

# torchvision's `features` layout: ("C", out, kernel, stride, pad) | "R" ReLU | "M" max-pool 3/2 (alex) or 2/2 (vgg)
_Conv = tuple[str, int, int, int, int]
_ALEX: list[_Conv | str] = [("C", 64, 11, 4, 2), "R", "M", ("C", 192, 5, 1, 2), "R", "M", ("C", 384, 3, 1, 1), "R",
                            ("C", 256, 3, 1, 1), "R", ("C", 256, 3, 1, 1), "R"]
_VGG: list[_Conv | str] = [("C", 64, 3, 1, 1), "R", ("C", 64, 3, 1, 1), "R", "M",
                           ("C", 128, 3, 1, 1), "R", ("C", 128, 3, 1, 1), "R", "M",
                           ("C", 256, 3, 1, 1), "R", ("C", 256, 3, 1, 1), "R", ("C", 256, 3, 1, 1), "R", "M",
                           ("C", 512, 3, 1, 1), "R", ("C", 512, 3, 1, 1), "R", ("C", 512, 3, 1, 1), "R", "M",
                           ("C", 512, 3, 1, 1), "R", ("C", 512, 3, 1, 1), "R", ("C", 512, 3, 1, 1), "R"]
# indices (into `features`) of the ReLU outputs that LPIPS taps
_TAPS = {"alex": (1, 4, 7, 9, 11), "vgg": (3, 8, 15, 22, 29)}
_SPECS = {"alex": _ALEX, "vgg": _VGG}
_POOL = {"alex": (3, 2), "vgg": (2, 2)}

BACKBONE_FILES = {"alex": "alexnet-owt-7be5be79.pth", "vgg": "vgg16-397923af.pth"}
HEAD_FILES = {"alex": "alex.pth", "vgg": "vgg.pth"}
# input scaling layer of LPIPS v0.1 (ImageNet statistics expressed for [-1, 1] inputs)
SHIFT = (-0.030, -0.088, -0.188)
SCALE = (0.458, 0.448, 0.450)
_NORM_EPS = 1e-10


def _check_net(net: str) -> str:
    net = "vgg" if net == "vgg16" else net
    if net not in _SPECS:
        raise ValueError(f"LPIPS net must be 'alex' or 'vgg', got {net!r}")
    return net


def default_backbone_path(net: str = "alex") -> Path:
    """$TORCH_HOME/hub/checkpoints/<torchvision file> (torch.hub.get_dir() honours TORCH_HOME / XDG_CACHE_HOME)."""
    return Path(torch.hub.get_dir()) / "checkpoints" / BACKBONE_FILES[_check_net(net)]


def default_heads_path(net: str = "alex") -> Path | None:
    """lpips/weights/v0.1/<net>.pth inside the installed `lpips` package, or None when it is not installed."""
    spec = importlib.util.find_spec("lpips")
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0]) / "weights" / "v0.1" / HEAD_FILES[_check_net(net)]


def resolve_weight_paths(net: str = "alex", backbone_path: str | Path | None = None,
                         heads_path: str | Path | None = None) -> tuple[Path, Path]:
    """Both weight files, or FileNotFoundError naming every missing file and where to put it."""
    net = _check_net(net)
    bb = Path(backbone_path) if backbone_path else default_backbone_path(net)
    hp = Path(heads_path) if heads_path else default_heads_path(net)
    missing = []
    if not bb.is_file():
        missing.append(f"backbone {BACKBONE_FILES[net]} not at {bb} (copy torchvision's ImageNet file there, set "
                       f"TORCH_HOME to a folder holding hub/checkpoints/{BACKBONE_FILES[net]}, or pass backbone_path)")
    if hp is None or not hp.is_file():
        where = hp if hp is not None else "lpips/weights/v0.1/ (the `lpips` package is not installed)"
        missing.append(f"linear heads v0.1/{HEAD_FILES[net]} not at {where} (pip install lpips, or pass heads_path)")
    if missing:
        raise FileNotFoundError("LPIPS weights missing, nothing is downloaded: " + "; ".join(missing))
    assert hp is not None  # a None hp is listed in `missing` above
    return bb, hp


def _backbone_key(key: str) -> str | None:
    """Map torchvision ('features.3.weight') and lpips ('net.slice2.3.weight') keys to 'features.3.weight'."""
    parts = key.split(".")
    if parts[0] == "module":
        parts = parts[1:]
    if len(parts) == 3 and parts[0] == "features":
        return ".".join(parts)
    if len(parts) == 4 and parts[0] == "net" and parts[1].startswith("slice"):
        return ".".join(["features"] + parts[2:])
    return None


def _head_key(key: str) -> str | None:
    """Map lpips heads ('lin2.model.1.weight', or 'lin2.model.0.weight' without dropout) to 'heads.2'."""
    parts = key.split(".")
    if parts[0].startswith("lin") and parts[0][3:].isdigit() and parts[-1] == "weight":
        return f"heads.{int(parts[0][3:])}"
    return None


class LPIPS(nn.Module):
    """Frozen LPIPS distance. forward(x, y, zero_one=False) -> (...,) one distance per frame pair."""

    shift: torch.Tensor  # buffers registered in __init__
    scale: torch.Tensor

    def __init__(self, net: str = "alex", chunk: int = 512):
        super().__init__()
        self.net = _check_net(net)
        self.chunk = int(chunk)  # frames per backbone pass: bounds activation memory at large batches
        layers: list[nn.Module] = []
        c_in = 3
        k, s = _POOL[self.net]
        for item in _SPECS[self.net]:
            if item == "R":
                layers.append(nn.ReLU())
            elif item == "M":
                layers.append(nn.MaxPool2d(k, s))
            else:
                _, c_out, ks, st, pad = cast(_Conv, item)
                layers.append(nn.Conv2d(c_in, c_out, ks, st, pad))
                c_in = c_out
        self.features = nn.Sequential(*layers)
        self.taps = _TAPS[self.net]
        chans = [cast(nn.Conv2d, self.features[i - 1]).out_channels for i in self.taps]
        self.heads = nn.ParameterList([nn.Parameter(torch.zeros(c)) for c in chans])
        self.register_buffer("shift", torch.tensor(SHIFT).view(1, 3, 1, 1))
        self.register_buffer("scale", torch.tensor(SCALE).view(1, 3, 1, 1))
        self.requires_grad_(False)
        self.eval()

    # ---------------------------------------------------------------- weights
    def load_weights(self, state: dict) -> "LPIPS":
        """Load backbone and/or heads from torchvision-, lpips- or our own-format state dicts (others ignored)."""
        own = self.state_dict()
        bb: dict[str, torch.Tensor] = {}
        heads: dict[str, torch.Tensor] = {}
        for key, val in state.items():
            if key in own:  # our own format
                (heads if key.startswith("heads.") else bb)[key] = val
            elif (k := _backbone_key(key)) is not None and k in own:
                bb[k] = val
            elif (k := _head_key(key)) is not None and k in own:
                heads[k] = val.reshape(-1)
        with torch.no_grad():
            for k, v in {**bb, **heads}.items():
                if own[k].shape != v.shape:
                    raise ValueError(f"LPIPS {self.net}: weight {k} has shape {tuple(v.shape)}, "
                                     f"expected {tuple(own[k].shape)} (wrong net?)")
                own[k].copy_(v)
        return self

    def load_backbone(self, path: str | Path) -> "LPIPS":
        sd = torch.load(Path(path), map_location="cpu", weights_only=True)
        own = [k for k in self.state_dict() if k.startswith("features.")]
        got = {_backbone_key(k) for k in sd}
        if not all(k in got for k in own):
            raise ValueError(f"{path} is not a torchvision {self.net} checkpoint (missing "
                             f"{[k for k in own if k not in got][:4]}...)")
        return self.load_weights(sd)

    def load_heads(self, path: str | Path) -> "LPIPS":
        sd = torch.load(Path(path), map_location="cpu", weights_only=True)
        if sum(_head_key(k) is not None for k in sd) != len(self.heads):
            raise ValueError(f"{path} does not hold the {len(self.heads)} LPIPS linear heads for {self.net}")
        return self.load_weights(sd)

    @classmethod
    def from_pretrained(cls, net: str = "alex", backbone_path: str | Path | None = None,
                        heads_path: str | Path | None = None, device: str | torch.device = "cpu",
                        chunk: int = 512) -> "LPIPS":
        bb, hp = resolve_weight_paths(net, backbone_path, heads_path)
        m = cls(net, chunk=chunk).load_backbone(bb).load_heads(hp)
        return m.to(device)

    def to_channels_last(self) -> "LPIPS":
        return self.to(memory_format=torch.channels_last)

    # ---------------------------------------------------------------- forward
    def _check_range(self, t: torch.Tensor, name: str, zero_one: bool) -> None:
        if not t.is_floating_point():
            raise ValueError(f"LPIPS {name} must be a float tensor, got {t.dtype}")
        if t.dim() < 3 or t.shape[-3] != 3:
            raise ValueError(f"LPIPS {name} must be (..., 3, H, W), got {tuple(t.shape)}")
        lo, hi = (0.0, 1.0) if zero_one else (-1.0, 1.0)
        tmn, tmx = torch.aminmax(t.detach().float())
        mn, mx = float(tmn), float(tmx)  # one sync; NaN fails both comparisons below
        if not (mn >= lo - 1e-4 and mx <= hi + 1e-4):
            rng = "[0, 1] (zero_one=True)" if zero_one else "[-1, 1] (pass zero_one=True for [0, 1] frames)"
            raise ValueError(f"LPIPS {name} outside {rng}: min {mn:.4g}, max {mx:.4g}")

    def _features(self, x: torch.Tensor, zero_one: bool, amp: bool) -> list[torch.Tensor]:
        """Unit-normalised taps, fp32, (B, C_l, h_l, w_l) each."""
        x = x.float()
        if zero_one:
            x = x * 2 - 1
        h = (x - self.shift) / self.scale
        if x.is_cuda:
            h = h.contiguous(memory_format=torch.channels_last)
        out = []
        ctx = torch.autocast("cuda", dtype=torch.bfloat16) if amp else contextlib.nullcontext()
        with ctx:
            for i, layer in enumerate(self.features[: self.taps[-1] + 1]):
                h = layer(h)
                if i in self.taps:
                    f = h.float()
                    out.append(f / (f.pow(2).sum(1, keepdim=True).sqrt() + _NORM_EPS))
        return out

    def _distance(self, fx: list[torch.Tensor], fy: list[torch.Tensor]) -> torch.Tensor:
        d: torch.Tensor | float = 0.0
        for a, b, w in zip(fx, fy, self.heads):
            d = d + (a - b).pow(2).mean((2, 3)) @ w.float()
        return cast(torch.Tensor, d)  # a tensor: there is always at least one head

    def forward(self, x: torch.Tensor, y: torch.Tensor, zero_one: bool = False, amp: bool | None = None,
                check_range: bool = True) -> torch.Tensor:
        """x (..., 3, H, W), y broadcastable to x -> distances x.shape[:-3]. amp: bf16 autocast (default: on CUDA)."""
        if x.shape[-3:] != y.shape[-3:]:
            raise ValueError(f"LPIPS frames differ in shape: {tuple(x.shape)} vs {tuple(y.shape)}")
        try:
            lead = torch.broadcast_shapes(x.shape[:-3], y.shape[:-3])
        except RuntimeError:
            raise ValueError(f"LPIPS: y {tuple(y.shape)} does not broadcast to x {tuple(x.shape)}") from None
        if check_range:
            self._check_range(x, "x", zero_one)
            self._check_range(y, "y", zero_one)
        amp = x.is_cuda if amp is None else amp
        if amp and not x.is_cuda:
            raise ValueError("LPIPS bf16 autocast is a GPU path; on the CPU use amp=False (fp32)")
        img = x.shape[-3:]
        if x.shape[:-3] != lead:
            x = x.expand(*lead, *img)
        xs = x.reshape(-1, *img)
        m, c = xs.shape[0], self.chunk
        out = torch.empty(m, device=x.device, dtype=torch.float32)
        if y.shape[:-3] == lead:  # same shape: one backbone pass per chunk over [x; y]
            ys = y.reshape(-1, *img)
            for s in range(0, m, c):
                f = self._features(torch.cat([xs[s:s + c], ys[s:s + c]]), zero_one, amp)
                n = min(c, m - s)
                out[s:s + n] = self._distance([t[:n] for t in f], [t[n:] for t in f])
        else:  # broadcast y: its features once, gathered per chunk
            ny = y.reshape(-1, *img)
            fy = [torch.cat(p) for p in zip(*(self._features(ny[s:s + c], zero_one, amp)
                                                 for s in range(0, ny.shape[0], c)))]
            yshape = y.shape[:-3]
            idx = torch.arange(ny.shape[0], device=x.device).reshape(yshape if len(yshape) else ())
            idx = idx.expand(lead).reshape(-1)
            for s in range(0, m, c):
                fx = self._features(xs[s:s + c], zero_one, amp)
                sel = idx[s:s + c]
                out[s:s + len(sel)] = self._distance(fx, [t[sel] for t in fy])
        return out.reshape(lead)


_CACHE: dict = {}


def get_lpips(net: str = "alex", device: str | torch.device = "cpu", backbone_path: str | Path | None = None,
              heads_path: str | Path | None = None) -> LPIPS:
    """Process-wide cache of pretrained LPIPS models (the reward calls this every step)."""
    dev = torch.device(device)
    bb, hp = resolve_weight_paths(net, backbone_path, heads_path)
    key = (_check_net(net), str(dev), str(bb), str(hp))
    if key not in _CACHE:
        m = LPIPS.from_pretrained(net, bb, hp, device=dev)
        _CACHE[key] = m.to_channels_last() if dev.type == "cuda" else m
    return _CACHE[key]
