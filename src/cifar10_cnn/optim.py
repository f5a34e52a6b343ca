"""Optimizers beyond torch.optim.SGD: Muon for conv filters, with SGD for everything else, in one optimizer.

Muon (Jordan et al., 2024) replaces each filter's momentum update by the nearest semi-orthogonal matrix,
computed with a few Newton-Schulz iterations; it is what lets the fast recipe reach 94% in 8 epochs.
"""

from __future__ import annotations

import torch

# Coefficients of the quintic Newton-Schulz iteration published with Muon (tuned for speed, not exactness).
NS_COEFFS = (3.4445, -4.7750, 2.0315)


def orthogonalize(g: torch.Tensor, steps: int = 3, eps: float = 1e-7) -> torch.Tensor:
    """Approximately U V^T of g = U S V^T (g is 2-D), by Newton-Schulz iterations."""
    a, b, c = NS_COEFFS
    x = g / (g.norm() + eps)
    transposed = x.size(0) > x.size(1)
    if transposed:
        x = x.T
    for _ in range(steps):
        s = x @ x.T
        x = a * x + (b * s + c * s @ s) @ x
    return x.T if transposed else x


class Muon(torch.optim.Optimizer):
    """Param groups with muon=True get Muon updates (normalised weights, orthogonalised Nesterov momentum);
    the others get SGD with (Nesterov) momentum and weight decay, exactly like torch.optim.SGD."""

    def __init__(
        self,
        params,
        lr: float = 0.01,
        momentum: float = 0.9,
        nesterov: bool = True,
        weight_decay: float = 0.0,
        muon: bool = False,
        ns_steps: int = 3,
    ):
        defaults = dict(
            lr=lr,
            momentum=momentum,
            nesterov=nesterov,
            weight_decay=weight_decay,
            muon=muon,
            ns_steps=ns_steps,
        )
        super().__init__(params, defaults)

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            lr, momentum, nesterov = group["lr"], group["momentum"], group["nesterov"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                g = p.grad
                if group["weight_decay"] and not group["muon"]:
                    g = g.add(p, alpha=group["weight_decay"])
                state = self.state[p]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = g.clone()
                else:
                    state["momentum_buffer"].mul_(momentum).add_(g)
                buf = state["momentum_buffer"]
                update = g.add(buf, alpha=momentum) if nesterov else buf
                if group["muon"]:
                    p.mul_(len(p) ** 0.5 / p.norm())  # keep each filter bank at a fixed norm
                    update = orthogonalize(update.reshape(len(update), -1), group["ns_steps"]).view_as(p)
                p.add_(update, alpha=-lr)
