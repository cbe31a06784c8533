"""Optimisation pieces of the SimCLR recipe: LARS, parameter groups, learning-rate scaling."""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Literal

import lightning as L
import torch
from torch import Tensor, nn
from torch.optim import Optimizer

from simclr_lightning.errors import require

# moved to schedule.py; still importable from here
from simclr_lightning.schedule import (  # noqa: F401
    WarmupCosine,
    global_batch_size,
    schedule_steps,
    warmup_cosine,
)

LRScaling = Literal["linear", "sqrt", "none"]
OptimizerName = Literal["lars", "sgd", "adamw"]


class LARS(Optimizer):
    """Layer-wise Adaptive Rate Scaling (You et al. 2017) as SimCLR's reference code applies it.

    Per parameter: ``g += wd * w``; ``lr_local = lr * eta * ||w|| / ||g||`` (1 when either
    norm is 0); ``v = momentum * v + lr_local * g``; ``w -= v``. Groups with
    ``lars_adaptation=False`` (BatchNorm and biases in SimCLR) skip the trust ratio and are
    plain SGD with momentum.

    ``foreach`` (default: when every parameter is on a GPU, as torch's optimizers choose)
    updates all parameters of a group with multi-tensor kernels, the per-parameter trust
    ratios staying on the device; otherwise one loop over the parameters.
    """

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict],
        lr: float,
        momentum: float = 0.9,
        weight_decay: float = 0.0,
        eta: float = 0.001,
        nesterov: bool = False,
        lars_adaptation: bool = True,
        foreach: bool | None = None,
    ) -> None:
        if lr < 0 or momentum < 0 or weight_decay < 0 or eta <= 0:
            raise ValueError("LARS needs lr >= 0, momentum >= 0, weight_decay >= 0, eta > 0")
        defaults = dict(
            lr=lr,
            momentum=momentum,
            weight_decay=weight_decay,
            eta=eta,
            nesterov=nesterov,
            lars_adaptation=lars_adaptation,
            foreach=foreach,
        )
        super().__init__(params, defaults)

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if not params:
                continue
            foreach = group.get("foreach")
            if foreach is None:  # as torch's optimizers choose: the loop on the CPU
                foreach = all(p.is_cuda for p in params)
            (self._step_foreach if foreach else self._step_loop)(group, params)
        return loss

    def _buffers(self, params: list[Tensor]) -> list[Tensor]:
        for p in params:
            if "momentum_buffer" not in self.state[p]:
                self.state[p]["momentum_buffer"] = torch.zeros_like(p)
        return [self.state[p]["momentum_buffer"] for p in params]

    def _step_loop(self, group: dict, params: list[Tensor]) -> None:
        lr, momentum = group["lr"], group["momentum"]
        for p, buf in zip(params, self._buffers(params), strict=True):
            grad = p.grad
            if group["weight_decay"] != 0:
                grad = grad.add(p, alpha=group["weight_decay"])
            if group["lars_adaptation"]:
                w_norm = torch.linalg.vector_norm(p)
                g_norm = torch.linalg.vector_norm(grad)
                trust = torch.where(
                    (w_norm > 0) & (g_norm > 0),
                    group["eta"] * w_norm / g_norm,
                    torch.ones_like(w_norm),
                )
                scaled = grad * (trust * lr)
            else:
                scaled = grad * lr
            buf.mul_(momentum).add_(scaled)
            update = buf * momentum + scaled if group["nesterov"] else buf
            p.sub_(update)

    def _step_foreach(self, group: dict, params: list[Tensor]) -> None:
        """The same update in a handful of multi-tensor kernels instead of about ten
        kernels per parameter (ResNet-50: 161 parameters), with the trust ratios kept on
        the device: no host sync."""
        lr, momentum = group["lr"], group["momentum"]
        bufs = self._buffers(params)
        grads = [p.grad for p in params]
        if group["weight_decay"] != 0:
            grads = torch._foreach_add(grads, params, alpha=group["weight_decay"])
        rates = None
        if group["lars_adaptation"]:
            w_norm = torch.stack(torch._foreach_norm(params))
            g_norm = torch.stack(torch._foreach_norm(grads))
            ok = (w_norm > 0) & (g_norm > 0)
            trust = torch.where(ok, group["eta"] * w_norm / g_norm.where(ok, 1.0), 1.0)
            rates = list((trust * lr).unbind())

        def add_scaled(target: list[Tensor]) -> None:  # target += rate * grad
            if rates is None:
                torch._foreach_add_(target, grads, alpha=lr)
            else:
                torch._foreach_addcmul_(target, rates, grads)

        torch._foreach_mul_(bufs, momentum)
        add_scaled(bufs)
        update = bufs
        if group["nesterov"]:
            update = torch._foreach_mul(bufs, momentum)
            add_scaled(update)
        torch._foreach_sub_(params, update)


def param_groups(model: nn.Module, weight_decay: float, exclude_bn_bias: bool = True) -> list[dict]:
    """Two groups: weights that are decayed (and LARS-adapted), and BatchNorm/bias parameters
    that are not, as in SimCLR. One-dimensional parameters are exactly the BN and bias ones
    in the ResNet + MLP head this library builds; a timm encoder's ``no_weight_decay()``
    names (a ViT's ``cls_token`` and ``pos_embed``) join them, as timm's optimizers do."""
    if not exclude_bn_bias:
        params = [p for p in model.parameters() if p.requires_grad]
        return [{"params": params, "weight_decay": weight_decay, "lars_adaptation": True}]
    exempt = set()
    for prefix, module in model.named_modules():
        if callable(names := getattr(module, "no_weight_decay", None)):
            exempt |= {f"{prefix}.{name}" if prefix else name for name in names()}
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (no_decay if p.ndim <= 1 or name in exempt else decay).append(p)
    return [
        {"params": decay, "weight_decay": weight_decay, "lars_adaptation": True},
        {"params": no_decay, "weight_decay": 0.0, "lars_adaptation": False},
    ]


def scaled_learning_rate(base_lr: float, global_batch_size: int, scaling: LRScaling) -> float:
    """SimCLR's rule: ``base_lr * B / 256`` (linear) or ``base_lr * sqrt(B)`` (sqrt, the
    paper's choice for small batches and long training)."""
    if scaling == "linear":
        return base_lr * global_batch_size / 256
    if scaling == "sqrt":
        return base_lr * math.sqrt(global_batch_size)
    require(scaling == "none", "model.lr_scaling", scaling, "one of linear, sqrt, none")
    return base_lr


def build_optimizer(
    name: OptimizerName,
    groups: list[dict],
    lr: float,
    momentum: float,
    lars_eta: float,
) -> Optimizer:
    if name == "lars":
        return LARS(groups, lr=lr, momentum=momentum, eta=lars_eta)
    # The extra group key is LARS's; torch's optimizers keep unknown keys untouched.
    if name == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=momentum)
    if name == "adamw":
        return torch.optim.AdamW(groups, lr=lr)
    raise ValueError(f"optimizer={name!r} is unknown: choose one of lars, sgd, adamw")


def classifier_rates(
    trainer: L.Trainer, lr: float, backbone_lr: float | None, lr_scaling: LRScaling
) -> tuple[float, float]:
    """The classifier's and the encoder's peak rates (``backbone_lr`` None: ``lr``): the
    rule scales both by the images of an optimizer step (devices x nodes x data.batch_size x
    trainer.accumulate_grad_batches)."""
    scale = 1.0
    if lr_scaling != "none":
        scale = scaled_learning_rate(1.0, global_batch_size(trainer), lr_scaling)
    return lr * scale, (lr if backbone_lr is None else backbone_lr) * scale


def classifier_optimizer(
    name: Literal["sgd", "lars"],
    head: nn.Module,
    encoders: list[nn.Module],
    lr: float,
    encoder_lr: float,
    weight_decay: float,
    momentum: float,
    nesterov: bool,
) -> Optimizer:
    """Linear evaluation's optimizer (fine-tuning's when ``encoders`` are given): as
    google-research/simclr's ``head_supervised``, no LARS trust ratio on the classifier (at
    eta 0.001 it would barely move) and L2 decay on its weight only; the encoders at
    ``encoder_lr``, LARS-adapted except biases and BatchNorm."""
    groups = [dict(g, lr=lr, lars_adaptation=False) for g in param_groups(head, weight_decay)]
    for encoder in encoders:
        groups += [dict(g, lr=encoder_lr) for g in param_groups(encoder, weight_decay)]
    groups = [g for g in groups if g["params"]]
    if name == "lars":
        return LARS(groups, lr=lr, momentum=momentum, nesterov=nesterov)
    return torch.optim.SGD(groups, lr=lr, momentum=momentum, nesterov=nesterov)
