"""Classifier heads with parameters stacked over M configurations.

Every trained head is one of two batched parametrisations:

* ``affine``: z = s * (x W^T + b) + c * u, parameters W [M,K,D], b, s, c [M,K] and a fixed
  per-class vector u [M,K]. Each head kind trains a subset of them (a per-parameter,
  per-configuration learning-rate multiplier of 0 freezes a parameter):

  =========  ===============================================  ====================================
  kind       trained (init)                                    source
  =========  ===============================================  ====================================
  linear     W, b (stage 1, or fresh ``nn.Linear`` init)       cRT (fresh), LOS/LTWB (stage 1)
  lws        s (1); W, b frozen from stage 1                   cRT TauNormClassifier (z = s*(Wf+b))
  mislas     W, b (stage 1, lr x lr_factor) and s (1, lr)      MiSLAS train_stage2 + learned_norm
  marc       s = a (1), c = b (0); u = ||w_j|| of stage 1      MARC MARCLinear
  =========  ===============================================  ====================================

* ``cosine``: z = scale * <x/||x||, w_j/||w_j||>, W [M,K,D] fresh with unit rows
  (LDAM/MiSLAS ``NormedLinear``: uniform(-1,1) then renormed), no bias, fixed scale.

* a **plugin family** (:func:`register_head`): a head of its own, written on M stacked
  members: ``init`` (one member's parameters and buffers), ``forward(p, buf, x [M, B, D]) ->
  z [M, B, K]`` and optionally ``backward`` (else autograd through ``forward``).

The family is part of a sweep group's key; configurations of one family share one
batched matmul per step. The registry (``HEADS``, :func:`register_head`) lives in
:mod:`ltcache.stage2.head_kinds`, which loads without torch; it is re-exported here.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F

from ltcache.errors import LtcacheError
from ltcache.stage2.head_kinds import (AFFINE_PARAMS, COSINE_PARAMS, HEADS, HeadKind, PluginHead,  # noqa: F401
                                        get_head, param_names, register_head)  # (re-exported)


def init_head(kind: HeadKind, init: str, w0: torch.Tensor, b0: torch.Tensor, g: torch.Generator,
              bias_init: Optional[float] = None) -> tuple[dict, dict]:
    """Initial parameters and fixed buffers of ONE configuration (CPU tensors).

    ``init`` is ``stage1`` (copy the stage-1 classifier) or ``fresh`` (``nn.Linear`` default:
    U(-1/sqrt(D), 1/sqrt(D)) for W and b; cosine: unit rows). Random draws use ``g``.
    """
    k, d = w0.shape
    if kind.plugin is not None:
        return _plugin_init(kind, init, w0, b0, g)
    if kind.family == "cosine":
        w = torch.rand(k, d, generator=g) * 2 - 1
        w = w / w.norm(dim=1, keepdim=True).clamp_min(1e-12)
        return {"W": w}, {}
    if init == "fresh":
        bound = 1.0 / math.sqrt(d)
        w = (torch.rand(k, d, generator=g) * 2 - 1) * bound
        b = (torch.rand(k, generator=g) * 2 - 1) * bound
    elif init == "stage1":
        w, b = w0.clone().float(), b0.clone().float()
    else:
        raise LtcacheError(f"unknown head init '{init}'; use stage1 or fresh")
    if bias_init is not None:
        b = torch.full((k,), float(bias_init))
    params = {"W": w, "b": b, "s": torch.ones(k), "c": torch.zeros(k)}
    u = w0.norm(dim=1).float() if kind.uses_base_norm else torch.zeros(k)
    return params, {"u": u}


def _plugin_init(kind: HeadKind, init: str, w0: torch.Tensor, b0: torch.Tensor, g: torch.Generator) -> tuple:
    """A plugin head's init, checked: every declared parameter a float tensor, buffers tensors."""
    where = f"head '{kind.name}' ({HEADS.origin(kind.name)})"
    try:
        out = kind.plugin.init(w0.clone(), b0.clone(), g, init)
        params, bufs = out
    except LtcacheError:
        raise
    except Exception as exc:
        raise LtcacheError(f"{where}: init raised {type(exc).__name__}: {exc}; fix its init") from None
    if set(params) != set(kind.plugin.params) or not all(isinstance(t, torch.Tensor) and t.is_floating_point()
                                                         for t in params.values()):
        raise LtcacheError(f"{where}: init must return ({{{', '.join(kind.plugin.params)}}} as float tensors, "
                           "buffers); fix its init")
    return {a: t.detach().float().cpu() for a, t in params.items()}, {a: t.detach().cpu() for a, t in dict(bufs).items()}


def dense(x) -> torch.Tensor:
    """Features [M, B, D] of a step, SharedRows expanded (plugin heads read one row block per member)."""
    if not isinstance(x, SharedRows):
        return x
    return torch.cat([x.xs.repeat_interleave(x.r, 0), x.rest])


def _unit_rows(x: torch.Tensor) -> torch.Tensor:
    """Rows scaled to unit norm, computed in float32 at least and returned in x's dtype."""
    if x.dtype in (torch.float16, torch.bfloat16):
        return F.normalize(x.float(), dim=-1).to(x.dtype)
    return F.normalize(x, dim=-1)


@dataclass
class SharedRows:
    """A training step's features when blocks of members read the same rows.

    Members trained with the same sampler, seed, epochs and init draws read identical batches
    (see ``grouping.stream_blocks``). The engine lays such members out in
    blocks of ``r``: the first S*r members read the S gathered batches ``xs`` [S, B, D] (block
    i = members i*r .. i*r + r - 1), the others their own rows ``rest`` [M - S*r, B, D]. One
    gather then serves a block, and its r heads multiply it as one [r*K, D] x [D, B] product,
    a wider GEMM than r separate [K, D] ones.
    """

    xs: torch.Tensor
    r: int
    rest: torch.Tensor

    def map(self, fn) -> "SharedRows":
        return SharedRows(fn(self.xs), self.r, fn(self.rest) if self.rest.shape[0] else self.rest)


def _split(t: torch.Tensor, x: SharedRows) -> tuple[torch.Tensor, torch.Tensor]:
    """t [M, K, *] as (blocks [S, r*K, *], rest [M - S*r, K, *]) views."""
    s, r = x.xs.shape[0], x.r
    return t[:s * r].view(s, r * t.shape[1], *t.shape[2:]), t[s * r:]


def _block_parts(x: SharedRows, *blocks: torch.Tensor) -> list:
    """How to run the block GEMMs: one bmm ([(S, r*K, *) tensors]), or on a multi-threaded CPU
    one mm per block. There a CPU bmm splits its S products over the threads, unevenly when S
    is not a multiple of them (5 blocks on 2 threads: 142 vs 174 GFLOP/s at D 2048), while one
    mm uses every thread."""
    if x.xs.device.type == "cpu" and torch.get_num_threads() > 1:
        return [tuple(None if t is None else t[i:i + 1] for t in blocks) for i in range(x.xs.shape[0])]
    return [blocks]


def _wx(w: torch.Tensor, x, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Class-major products [M, K, B] = w x^T (+ bias [M, K, 1]) for x [M, B, D] or SharedRows.
    Features held in a lower precision (``--precision bf16``) multiply w cast to theirs; the
    products come back in w's dtype."""
    low = _low(w, x)
    if not isinstance(x, SharedRows):
        if low is not None:
            z = torch.bmm(w.to(low), x.transpose(1, 2)).to(w.dtype)
            return z if bias is None else z.add_(bias)
        return torch.bmm(w, x.transpose(1, 2)) if bias is None else torch.baddbmm(bias, w, x.transpose(1, 2))
    out = torch.empty(w.shape[0], w.shape[1], x.xs.shape[1], dtype=w.dtype, device=w.device)
    (wb, wr), (ob, orest) = _split(w, x), _split(out, x)
    bb, br = _split(bias, x) if bias is not None else (None, None)
    for wp, xp, op, bp in _block_parts(x, wb, x.xs, ob, bb) + [(wr, x.rest, orest, br)]:
        if op.shape[0]:
            if low is not None:
                op.copy_(torch.bmm(wp.to(low), xp.transpose(1, 2)))
                if bp is not None:
                    op.add_(bp)
            elif bp is None:
                torch.bmm(wp, xp.transpose(1, 2), out=op)
            else:
                torch.baddbmm(bp, wp, xp.transpose(1, 2), out=op)
    return out


def _low(t: torch.Tensor, x) -> Optional[torch.dtype]:
    """The features' dtype when it is not ``t``'s (a GEMM then runs in it), else None."""
    dt = (x.xs if isinstance(x, SharedRows) else x).dtype
    return dt if dt != t.dtype else None


def _gx(g: torch.Tensor, x, into: Optional[torch.Tensor] = None, beta: float = 0.0) -> torch.Tensor:
    """g [M, K, B] times x: the weight gradient [M, K, D]; with ``into``, into = beta*into + g x.
    With features in a lower precision, g is cast to it and the product accumulated in g's dtype."""
    low = _low(g, x)
    if not isinstance(x, SharedRows):
        if low is None:
            return torch.bmm(g, x) if into is None else into.baddbmm_(g, x, beta=beta)
        gx = torch.bmm(g.to(low), x).to(g.dtype)
        if into is None:
            return gx
        return into.copy_(gx) if beta == 0.0 else into.mul_(beta).add_(gx)     # beta 0: no 0 * NaN
    if into is None:
        into = torch.empty(g.shape[0], g.shape[1], x.xs.shape[2], dtype=g.dtype, device=g.device)
        beta = 0.0
    (gb, gr), (ib, ir) = _split(g, x), _split(into, x)
    for gp, xp, ip in _block_parts(x, gb, x.xs, ib) + [(gr, x.rest, ir)]:
        if ip.shape[0]:
            if low is None:
                ip.baddbmm_(gp, xp, beta=beta)
            elif beta == 0.0:                   # into may be uninitialised: no 0 * NaN
                ip.copy_(torch.bmm(gp.to(low), xp))
            else:
                ip.mul_(beta).add_(torch.bmm(gp.to(low), xp))
    return into


def forward_train(family: str, p: dict, buf: dict, x: "torch.Tensor | SharedRows", base: bool = False):
    """The logits of M heads, class-major [M, K, B], and what :func:`backward` needs: the one
    place the logit formula of each family is written (:func:`forward` and the engine's val
    selection read it too).

    affine: z = s * (x W^T + b) + c * u; s, c and u are left out when absent from ``p`` / ``buf``
    (the engine drops what no member trains: s = 1, c * u = 0). cosine: z = scale <x/||x||, w_j/||w_j||>.

    Class-major because the weight then multiplies the batch from the left (W x^T), which is
    several times faster than x W^T when K is small, and the loss reduces over K in that
    layout just as fast. ``base=True`` means ``x`` already holds the frozen base logits
    x W^T + b [M, B, K] (heads that train only the affine s, c on a frozen stage-1 layer: LWS,
    MARC); the engine then gathers K numbers per sample instead of D. ``x`` may be a
    :class:`SharedRows` (blocks of members on the same rows).
    """
    if family not in ("affine", "cosine"):
        x = dense(x).to(next(iter(p.values())).dtype)            # bf16 features: the head's dtype
        return _plugin_forward(family, p, buf, x).transpose(1, 2), x
    if family == "affine":
        if base:
            lin = x.transpose(1, 2).contiguous()
        else:
            lin = _wx(p["W"], x, p["b"].unsqueeze(2))
        z = lin if "s" not in p else p["s"].unsqueeze(2) * lin
        if "u" in buf:
            z = z + (p["c"] * buf["u"]).unsqueeze(2)
        return z, (x, lin)
    xn = x.map(_unit_rows) if isinstance(x, SharedRows) else _unit_rows(x)
    wnorm = p["W"].norm(dim=-1, keepdim=True).clamp_min(1e-12)
    wn = p["W"] / wnorm
    z = _wx(wn, xn).mul_(buf["scale"].view(-1, 1, 1))
    return z, (xn, wn, wnorm)


def _plugin_forward(family: str, p: dict, buf: dict, x: torch.Tensor) -> torch.Tensor:
    """z [M, B, K] of a plugin head, its shape checked (one line naming the plugin if wrong)."""
    z = HEADS[family].plugin.forward(p, buf, x)
    m, b = x.shape[:2]
    if not isinstance(z, torch.Tensor) or z.dim() != 3 or tuple(z.shape[:2]) != (m, b):
        raise LtcacheError(f"head '{family}' ({HEADS.origin(family)}): forward returned "
                           f"{tuple(z.shape) if isinstance(z, torch.Tensor) else type(z).__name__}, not [M, B, K] = "
                           f"[{m}, {b}, K]; fix its forward")
    return z


def _plugin_backward(family: str, p: dict, buf: dict, x: torch.Tensor, dz: torch.Tensor, need: tuple) -> dict:
    """A plugin head's parameter gradients: its own backward, or autograd through its forward."""
    head = HEADS[family].plugin
    where = f"head '{family}' ({HEADS.origin(family)})"
    dzb = dz.transpose(1, 2)
    if head.backward is not None:
        g = head.backward(p, buf, x, dzb)
    else:
        with torch.enable_grad():
            leaf = {a: t.detach().requires_grad_(a in need) for a, t in p.items()}
            z = head.forward(leaf, buf, x)
            if not z.requires_grad:
                raise LtcacheError(f"{where}: forward is not differentiable in its parameters and there is no "
                                   "backward; give backward(p, buf, x, dz) or use torch ops on p in forward")
            got = torch.autograd.grad(z, [leaf[a] for a in need], dzb, allow_unused=True)
        g = {a: (torch.zeros_like(p[a]) if t is None else t) for a, t in zip(need, got)}
    bad = [a for a in need if a not in g or tuple(g[a].shape) != tuple(p[a].shape)]
    if bad:
        raise LtcacheError(f"{where}: backward gave no gradient of the shape of {', '.join(bad)}; fix its backward")
    return g


def forward(family: str, p: dict, buf: dict, x: torch.Tensor) -> torch.Tensor:
    """Logits [M, B, K] of M heads on x [M, B, D], or on x [1, B, D] shared by all of them:
    :func:`forward_train` read batch-major (a shared x is one block of M members on the same
    rows, one GEMM). Differentiable for M = 1 or a per-member x (the tests' autograd reference)."""
    m = next(iter(p.values())).shape[0]
    if x.shape[0] != m:
        x = SharedRows(x, m, x[:0])
    return forward_train(family, p, buf, x)[0].transpose(1, 2)


def backward(family: str, p: dict, buf: dict, ctx, dz: torch.Tensor, need: tuple,
             into: Optional[dict] = None, beta: float = 0.0, s_span: Optional[tuple] = None) -> dict:
    """Gradients of the parameters in ``need`` given dL/dz (class-major [M, K, B]; modified in
    place).

    Hand-written: one bmm for the weight, reductions over the batch for the vectors. With
    ``into`` (the momentum buffers) each gradient is accumulated as into[a] = beta * into[a]
    + grad, the weight's inside its bmm (``baddbmm_``), which saves two passes over [M, K, D].
    ``s_span`` = (first, stop): the members whose scale s trains (the others keep s = 1), so
    the s terms run on that slice only.
    """
    g = {}

    def put(a: str, grad: torch.Tensor) -> None:
        if into is None:
            g[a] = grad
        else:
            into[a].mul_(beta).add_(grad)

    if family not in ("affine", "cosine"):
        for a, grad in _plugin_backward(family, p, buf, ctx, dz, need).items():
            put(a, grad)
        return g if into is None else into
    if family == "affine":
        x, lin = ctx
        if "s" in need:
            a, e = s_span or (0, dz.shape[0])
            ds = (dz[a:e] * lin[a:e]).sum(2)
            if (a, e) == (0, dz.shape[0]):
                put("s", ds)
            elif into is not None:          # outside the span s has lr 0: its buffer is never applied
                into["s"][a:e].mul_(beta).add_(ds)
            else:
                put("s", torch.zeros(dz.shape[:2], dtype=dz.dtype, device=dz.device).index_copy_(
                    0, torch.arange(a, e, device=dz.device), ds))
        if "c" in need:
            put("c", dz.sum(2) * buf["u"])
        if "W" in need or "b" in need:
            dlin = dz
            if "s" in need:
                a, e = s_span or (0, dz.shape[0])
                dlin[a:e] *= p["s"][a:e].unsqueeze(2)
            if "b" in need:
                put("b", dlin.sum(2))
            if "W" in need:
                if into is None:
                    g["W"] = _gx(dlin, x)
                else:
                    _gx(dlin, x, into["W"], beta)
        return g if into is None else into
    xn, wn, wnorm = ctx
    dwn = _gx(dz * buf["scale"].view(-1, 1, 1), xn)
    put("W", (dwn - wn * (dwn * wn).sum(-1, keepdim=True)) / wnorm)
    return g if into is None else into


def effective(family: str, p: dict, buf: dict) -> dict:
    """One configuration's head as a deployable layer (parameters without the M axis).

    affine -> {"kind": "linear", weight = diag(s) W, bias = s*b + c*u} (LWS, MiSLAS s and
    MARC's affine folded in); cosine -> {"kind": "cosine", weight, scale}.
    """
    if family not in ("affine", "cosine"):
        layer = {"kind": "plugin", "head": family, "p": dict(p), "buf": dict(buf)}
        if "W" in p:
            layer["weight"] = p["W"]
        return layer
    if family == "affine":
        return {"kind": "linear", "weight": p["s"].unsqueeze(1) * p["W"],
                "bias": p["s"] * p["b"] + p["c"] * buf["u"]}
    return {"kind": "cosine", "weight": p["W"].clone(), "scale": float(buf["scale"])}


def apply_layer(layer: dict, x: torch.Tensor) -> torch.Tensor:
    """Logits [N, K] of a deployable layer (see :func:`effective`) on features x [N, D]."""
    kind = layer["kind"]
    if kind == "linear":
        return x @ layer["weight"].t().to(x) + layer["bias"].to(x)
    if kind == "cosine":
        return layer["scale"] * F.normalize(x, dim=-1) @ F.normalize(layer["weight"].to(x), dim=-1).t()
    if kind == "plugin":
        p = {a: t.to(x).unsqueeze(0) for a, t in layer["p"].items()}
        buf = {a: t.to(x.device).unsqueeze(0) for a, t in layer["buf"].items()}
        return _plugin_forward(layer["head"], p, buf, x.unsqueeze(0))[0]
    if kind == "ncm":
        xh = F.normalize(x - layer["mean"].to(x), dim=-1)
        c = layer["centroids"].to(x)
        return -(xh.pow(2).sum(1, keepdim=True) + c.pow(2).sum(1) - 2 * xh @ c.t())
    raise LtcacheError(f"unknown head layer kind '{kind}'")


def weight_norms(layer: dict) -> Optional[torch.Tensor]:
    """Per-class L2 norm of a deployable layer's weight rows (NCM: centroid norms)."""
    if "weight" not in layer and "centroids" not in layer:
        return None                      # a plugin head without a weight W
    w = layer["weight"] if "weight" in layer else layer["centroids"]
    return w.double().norm(dim=1).cpu()
