"""DeepFool (Moosavi-Dezfooli, Fawzi & Frossard, CVPR 2016), L2, batched.

torchattacks' DeepFool builds a full Jacobian one image at a time (about 1 s per image on one CPU core
for the default model), which would make it the most expensive attack of the default evaluation by far.
This version follows the paper's Algorithm 2 on a whole batch at once: each step takes K backward passes
(one per class logit) for every image still classified correctly, moves it to the nearest linearised
class boundary, and the accumulated perturbation is scaled by ``1 + overshoot`` as in the paper's code.
Images stay in [0, 1]; an image whose label has already changed is no longer moved.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torchattacks.attack import Attack


class BatchedDeepFool(Attack):
    """DeepFool, L2, no fixed budget (a minimal-perturbation attack).

    Parameters
    ----------
    model : classifier taking images (N, C, H, W) in [0, 1].
    steps : int >= 1, most linearisation steps per image.
    overshoot : float >= 0, the final perturbation is ``(1 + overshoot)`` times the accumulated one.
    """

    def __init__(self, model, steps: int = 50, overshoot: float = 0.02) -> None:
        super().__init__("BatchedDeepFool", model)
        if steps < 1:
            raise ValueError(f"steps={steps} must be >= 1")
        if overshoot < 0:
            raise ValueError(f"overshoot={overshoot} must be >= 0")
        self.steps, self.overshoot = steps, overshoot
        self.supported_mode = ["default"]

    def forward(self, images: Tensor, labels: Tensor) -> Tensor:
        x0 = images.clone().detach().to(self.device)
        labels = labels.clone().detach().to(self.device)
        r_tot = torch.zeros_like(x0)
        active = torch.ones(len(x0), dtype=torch.bool, device=x0.device)
        adv = x0.clone()
        for _ in range(self.steps):
            idx = active.nonzero().flatten()
            if len(idx) == 0:
                break
            x = adv[idx].clone().requires_grad_(True)
            logits = self.get_logits(x)
            still = logits.argmax(1) == labels[idx]
            k = logits.shape[1]
            grads = torch.stack(
                [torch.autograd.grad(logits[:, j].sum(), x, retain_graph=j < k - 1)[0] for j in range(k)], 1
            )  # (n, K, C, H, W)
            y = labels[idx]
            rows = torch.arange(len(idx), device=x.device)
            f = (logits - logits[rows, y][:, None]).detach()  # f_k - f_y
            w = grads - grads[rows, y][:, None]
            wn = w.flatten(2).norm(dim=2).clamp_min(1e-12)
            dist = f.abs() / wn
            dist[rows, y] = float("inf")
            j = dist.argmin(1)
            step = (dist[rows, j] + 1e-4)[:, None, None, None] * w[rows, j] / wn[rows, j][:, None, None, None]
            step = step * still[:, None, None, None]  # fooled images are not moved any further
            r_tot[idx] = r_tot[idx] + step.detach()
            adv[idx] = (x0[idx] + (1 + self.overshoot) * r_tot[idx]).clamp(0, 1)
            active[idx] = still
        return adv.detach()
