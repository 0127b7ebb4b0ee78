"""The one training loop every profile and method uses: AdamW, linear warm-up, cosine decay."""
from __future__ import annotations

import math
import time
from typing import Callable

import torch

from bench.errors import CellFailure


def cosine_lr(step: int, total: int, base_lr: float, warmup: int = 0, min_lr: float = 0.0) -> float:
    if warmup and step < warmup:
        return base_lr * (step + 1) / warmup
    t = (step - warmup) / max(1, total - warmup)
    return min_lr + 0.5 * (base_lr - min_lr) * (1 + math.cos(math.pi * min(1.0, t)))


def train(model, task, *, epochs: float, lr: float, batch_size: int, device, seed: int,
          weight_decay: float = 0.05, warmup_epochs: float = 0.0, min_lr: float = 0.0,
          on_step: Callable[[int, int], None] | None = None, log: Callable[[str], None] | None = None,
          extra_loss: Callable[[], torch.Tensor] | None = None,
          log_every: int = 0, **_ignored) -> dict:
    """Train `model` on `task` for `epochs` epochs. `on_step(step, total)` runs after every optimizer
    step (methods use it to prune gradually or keep masked weights at zero); `extra_loss()` is added to
    the task loss (e.g. UPop's L1 term on its masks). Raises CellFailure on a
    non-finite loss, so the cell is reported with that reason."""
    steps_per_epoch = task.steps_per_epoch(batch_size)
    total = max(1, int(round(epochs * steps_per_epoch)))
    warmup = int(round(warmup_epochs * steps_per_epoch))
    decay, no_decay = [], []
    for n, p in model.named_parameters():
        if p.requires_grad:
            (no_decay if p.ndim <= 1 or n.endswith(".bias") or "pos_embed" in n or "cls_token" in n else decay).append(p)
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=lr)
    model.to(device).train()
    t0 = time.perf_counter()
    batches = task.train_batches(batch_size, seed)
    losses = []
    for step in range(total):
        cur = cosine_lr(step, total, lr, warmup, min_lr)
        for g in opt.param_groups:
            g["lr"] = cur
        batch = next(batches)
        loss = task.loss(model, batch, device)
        if extra_loss is not None:
            loss = loss + extra_loss()
        if not torch.isfinite(loss):
            raise CellFailure(f"non-finite loss ({loss.item()}) at step {step}/{total}")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if on_step is not None:
            on_step(step, total)
        losses.append(loss.item())
        if log and log_every and (step + 1) % log_every == 0:
            log(f"step {step + 1}/{total} loss {sum(losses[-log_every:]) / log_every:.4f} lr {cur:.2e}")
    model.eval()
    tail = losses[-max(1, steps_per_epoch):]
    return {"steps": total, "epochs": epochs, "final_loss": sum(tail) / len(tail), "seconds": time.perf_counter() - t0}
