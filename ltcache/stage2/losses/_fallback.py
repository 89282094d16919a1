"""The autograd fallback: dL/dz of members whose loss is given only as a forward.

A forward-only loss (``@ltcache.register_loss`` on a function) is plain PyTorch on ONE
configuration's logits ``z [B, K]`` and labels ``y [B]`` returning the mean loss. The engine
keeps its hand-written head backward and SGD update and only needs dL/dz: for each run of
members with the same loss and hyper-parameters it takes ``torch.func.vmap`` of
``torch.func.grad`` over the members when there are at least ``VMAP_MIN`` of them (one call
for all); fewer members, and forwards that vmap cannot run (``.item()``, data-dependent Python
control flow, randomness), go through one autograd call on the summed per-member losses
(measured: benchmarks/RESULTS.md "Autograd fallback vs analytic loss gradient").

Padding is handled as on the built-in path: a member's padded samples (the end of a short
last batch, or a whole inactive step) are cut off before its forward, so the loss sees only
valid samples and its mean is over them; their gradient is 0. At the first step each run is
checked (the forward raises, returns something other than a finite scalar, or gives a
non-finite gradient): a one-line LtcacheError naming where the loss was registered (the
plugin file) and the method. Later steps are not checked.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch

from ltcache.errors import LtcacheError
from ltcache.stage2.losses._core import get_loss

VMAP, LOOP = "vmap", "loop"
# vmap's fixed cost (~1 ms a call on a CPU) pays from about 8 members with the same loss and
# hyper-parameters on; fewer go through one autograd call on the summed per-member losses
# (benchmarks/RESULTS.md "Autograd fallback vs analytic loss gradient")
VMAP_MIN = 8


def _line(exc: BaseException) -> str:
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    return f"{type(exc).__name__}: {lines[0]}" if lines else type(exc).__name__


class _Run:
    """Members a..e (contiguous) sharing one forward-only loss and its hyper-parameters."""

    def __init__(self, a: int, e: int, name: str, params: dict, method: str, counts: torch.Tensor, mode: str):
        self.a, self.e = a, e
        self.unit = get_loss(name)
        self.params = params
        self.method = method
        self.mode = mode
        self.checked = False
        fwd, p, c = self.unit.forward, params, counts
        self.f = lambda z, y: fwd(z, y, p, c)
        self._vg = torch.func.vmap(torch.func.grad_and_value(self.f))

    @property
    def where(self) -> str:
        return f"{self.unit.origin}: loss '{self.unit.name}' of method {self.method}"

    def check_first(self, z: torch.Tensor, y: torch.Tensor) -> None:
        """One eager call of the forward on one member's valid samples: raises, shape, finiteness."""
        try:
            v = self.f(z.clone(), y.clone())             # a copy: a forward writing into z changes nothing
        except Exception as exc:
            raise LtcacheError(f"{self.where} raised {_line(exc)} at the first step; fix its forward") from None
        if not isinstance(v, torch.Tensor):
            raise LtcacheError(f"{self.where} returned {type(v).__name__}, not a tensor; return the mean loss "
                               "as a scalar tensor")
        if v.dim() != 0:
            raise LtcacheError(f"{self.where} returned shape {list(v.shape)}, not a scalar; return the mean "
                               "over the batch (e.g. loss.mean())")
        if not bool(torch.isfinite(v)):
            raise LtcacheError(f"{self.where} returned {float(v)} at the first step; make it finite "
                               "(e.g. clamp before a log)")

    def check_result(self, g: torch.Tensor, v: torch.Tensor) -> None:
        """At the first step: every member's loss and gradient finite."""
        if not bool(torch.isfinite(v).all()):
            raise LtcacheError(f"{self.where} returned a non-finite loss at the first step; make it finite")
        if not bool(torch.isfinite(g).all()):
            raise LtcacheError(f"{self.where} has a non-finite gradient at the first step; make it "
                               "differentiable there (e.g. clamp before a log or sqrt)")

    def vmapped(self, z: torch.Tensor, y: torch.Tensor) -> Optional[torch.Tensor]:
        """dL_i/dz_i of j members' valid samples by vmap (z [j, n, K], y [j, n] -> [j, n, K]);
        None (and loop mode from now on) if vmap cannot run the forward."""
        try:
            g, v = self._vg(z, y)
        except Exception:
            self.mode = LOOP
            return None
        if not self.checked:
            self.check_result(g, v)
        return g


class AutogradLossGrad:
    """dL/dz of m members with forward-only losses, in the engine's class-major layout.

    ``specs`` and ``methods`` are the members' loss specs and method names (loss order);
    ``counts`` the training class counts. Call with z [m, K, B], y [m, B], valid [m, B], the
    number of valid samples of each member (``n_valid``, a list) and whether every member's
    valid samples are its first ``n_valid`` (``prefix``, as the samplers pad)."""

    def __init__(self, specs: Sequence, methods: Sequence[str], counts: torch.Tensor, device,
                 mode: str = VMAP, vmap_min: int = VMAP_MIN):
        self.counts = counts.to(device=device, dtype=torch.float32)
        self.vmap_min = vmap_min
        self.runs: list[_Run] = []
        a = 0
        for i in range(1, len(specs) + 1):
            if i == len(specs) or (specs[i].user, specs[i].user_params) != (specs[a].user, specs[a].user_params):
                self.runs.append(_Run(a, i, specs[a].user, dict(specs[a].user_params), methods[a], self.counts, mode))
                a = i

    def __call__(self, z: torch.Tensor, y: torch.Tensor, valid: torch.Tensor,
                 n_valid: Optional[list] = None, prefix: bool = True) -> torch.Tensor:
        m, k, b = z.shape
        zb = z.transpose(1, 2)                                   # [m, B, K]: what a forward sees per member
        if n_valid is None:
            n_valid = [int(n) for n in valid.sum(1).tolist()]

        def samples(i: int):
            return slice(0, n_valid[i]) if prefix else valid[i] > 0

        out = torch.zeros(m, b, k, dtype=z.dtype, device=z.device)
        loop: list[tuple[_Run, int]] = []
        for run in self.runs:
            live = [i for i in range(run.a, run.e) if n_valid[i]]
            if not live:
                continue
            if not run.checked:
                run.check_first(zb[live[0], samples(live[0])], y[live[0], samples(live[0])])
            by_n: dict[int, list[int]] = {}
            for i in live:
                by_n.setdefault(n_valid[i] if prefix else -1, []).append(i)
            for n, idx in by_n.items():
                g = None
                if run.mode == VMAP and n > 0 and len(idx) >= self.vmap_min:
                    a, e = idx[0], idx[-1] + 1
                    if idx == list(range(a, e)):
                        g = run.vmapped(zb[a:e, :n], y[a:e, :n])
                        if g is not None:
                            out[a:e, :n] = g
                    else:
                        sel = torch.tensor(idx, device=z.device)
                        g = run.vmapped(zb.index_select(0, sel)[:, :n], y.index_select(0, sel)[:, :n])
                        if g is not None:
                            out[sel, :n] = g
                if g is None:
                    loop += [(run, i) for i in idx]
        if loop:
            self._loop(zb, y, samples, loop, out)
        for run in self.runs:
            run.checked = True
        return out.transpose(1, 2)

    @staticmethod
    def _loop(zb: torch.Tensor, y: torch.Tensor, samples, loop: list, out: torch.Tensor) -> None:
        """One autograd call on the summed losses of the ``loop`` members."""
        with torch.enable_grad():
            zz = zb.detach().requires_grad_(True)
            vals = []
            for run, i in loop:
                try:
                    vals.append(run.f(zz[i, samples(i)], y[i, samples(i)]).reshape(()))
                except Exception as exc:
                    raise LtcacheError(f"{run.where} raised {_line(exc)}; fix its forward") from None
            total = torch.stack(vals).sum()
            try:
                g = (torch.autograd.grad(total, zz)[0] if total.requires_grad else torch.zeros_like(zz))
            except Exception as exc:
                raise LtcacheError(f"{loop[0][0].where}: autograd failed ({_line(exc)}); fix its forward") from None
        idx = torch.tensor([i for _, i in loop], device=zb.device)
        for j, (run, i) in enumerate(loop):
            if not run.checked:
                run.check_result(g[i], vals[j].detach())
        out[idx] = g[idx]
