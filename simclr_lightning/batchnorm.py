"""BatchNorm over the global batch on any process-group backend: SimCLR normalises with the
statistics of all devices' images (the paper's global BN), and torch's ``SyncBatchNorm`` runs
only on CUDA, so ``trainer.sync_batchnorm`` used to crash under gloo on CPU."""

from __future__ import annotations

import torch
import torch.distributed as dist
from lightning.pytorch.plugins import LayerSync
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm


def _synced() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def _channel_view(t: Tensor, ndim: int) -> Tensor:
    return t.view(1, -1, *([1] * (ndim - 2)))


def global_batch_stats(x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Per-channel mean and biased variance of ``x`` over every rank's batch, and the number
    of values per channel (a tensor: no device-to-host wait). Each rank sends its count, mean
    and sum of squared deviations (one all-gather) and the parts are combined with Chan et
    al.'s formula, which keeps float32 accurate where a plain sum of squares would cancel."""
    dims = [0, *range(2, x.ndim)]
    count = x.numel() // x.size(1)
    local_mean = x.sum(dims) / max(count, 1)
    local_m2 = (x - _channel_view(local_mean, x.ndim)).square().sum(dims)
    ones = local_mean.new_ones(1)
    mine = torch.cat([local_mean, local_m2, ones * count])
    parts = [torch.empty_like(mine) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, mine)
    means, m2s, counts = torch.stack(parts).split([x.size(1), x.size(1), 1], dim=1)
    total = counts.sum()
    mean = (counts * means).sum(0) / total
    m2 = (m2s + counts * (means - mean).square()).sum(0)
    return mean, m2 / total, total


class _GlobalNormalize(torch.autograd.Function):
    """y = (x - mean) * invstd * weight + bias with global statistics; its backward all-reduces
    the two per-channel gradient sums so every rank's input gradient is the one a single
    process would compute on the concatenated batch (as torch's SyncBatchNorm does).

    Computed in the statistics' dtype (float32 at least) and returned in the input's; backward
    keeps the input as it came (bf16 under autocast) and recomputes the normalised input from
    it: a saved float32 copy held twice the memory of a plain BatchNorm's, for every layer."""

    @staticmethod
    def forward(ctx, x, weight, bias, mean, invstd, count):
        xhat = _normalized(x, mean, invstd)
        ctx.save_for_backward(x, weight, mean, invstd, count)
        y = xhat if weight is None else xhat * _channel_view(weight, x.ndim)
        y = y if bias is None else y + _channel_view(bias, x.ndim)
        return y.to(x.dtype)

    @staticmethod
    def backward(ctx, grad_out):
        x, weight, mean, invstd, count = ctx.saved_tensors
        xhat = _normalized(x, mean, invstd)
        grad_out = grad_out.to(xhat.dtype)
        dims = [0, *range(2, xhat.ndim)]
        sums = torch.cat([grad_out.sum(dims), (grad_out * xhat).sum(dims)])
        grad_bias, grad_weight = sums.clone().chunk(2)  # this rank's share; DDP reduces them
        dist.all_reduce(sums)
        sum_dy, sum_dy_xhat = (_channel_view(s / count, xhat.ndim) for s in sums.chunk(2))
        scale = invstd if weight is None else invstd * weight
        grad_x = _channel_view(scale, xhat.ndim) * (grad_out - sum_dy - xhat * sum_dy_xhat)
        return (
            grad_x.to(x.dtype),
            grad_weight if ctx.needs_input_grad[1] else None,
            grad_bias if ctx.needs_input_grad[2] else None,
            None,
            None,
            None,
        )


def _normalized(x: Tensor, mean: Tensor, invstd: Tensor) -> Tensor:
    return (x.to(mean.dtype) - _channel_view(mean, x.ndim)) * _channel_view(invstd, x.ndim)


class _GlobalBatchNormMixin:
    """Training forward on the global batch; eval mode and single-process runs are the plain
    BatchNorm forward. Running statistics get the global mean and the unbiased global variance,
    the same numbers on every rank."""

    def forward(self, input: Tensor) -> Tensor:
        if not (self.training and _synced()):
            return super().forward(input)
        self._check_input_dim(input)
        factor = 0.0 if self.momentum is None else self.momentum
        if self.track_running_stats and self.num_batches_tracked is not None:
            self.num_batches_tracked.add_(1)
            if self.momentum is None:  # cumulative moving average
                factor = 1.0 / float(self.num_batches_tracked)
        # statistics in float32 at least (inputs may be bf16/fp16 under autocast)
        dtype = torch.promote_types(input.dtype, torch.float32)
        with torch.no_grad():
            mean, var, count = global_batch_stats(input.to(dtype))
        if self.track_running_stats and self.running_mean is not None:
            with torch.no_grad():
                self.running_mean.lerp_(mean.to(self.running_mean.dtype), factor)
                unbiased = var * count / (count - 1)
                self.running_var.lerp_(unbiased.to(self.running_var.dtype), factor)
        invstd = torch.rsqrt(var + self.eps)
        weight = None if self.weight is None else self.weight.to(dtype)
        bias = None if self.bias is None else self.bias.to(dtype)
        return _GlobalNormalize.apply(input, weight, bias, mean, invstd, count)


class GlobalBatchNorm1d(_GlobalBatchNormMixin, nn.BatchNorm1d):
    """BatchNorm1d on the global batch (see :class:`GlobalBatchNorm`)."""


class GlobalBatchNorm2d(_GlobalBatchNormMixin, nn.BatchNorm2d):
    """BatchNorm2d on the global batch (see :class:`GlobalBatchNorm`)."""


class GlobalBatchNorm3d(_GlobalBatchNormMixin, nn.BatchNorm3d):
    """BatchNorm3d on the global batch (see :class:`GlobalBatchNorm`)."""


_GLOBAL = {
    nn.BatchNorm1d: GlobalBatchNorm1d,
    nn.BatchNorm2d: GlobalBatchNorm2d,
    nn.BatchNorm3d: GlobalBatchNorm3d,
}


def _global_class(module: nn.Module) -> type | None:
    """The global class for a BatchNorm whose forward is the stock one (ScaleBatchNorm1d's
    scale-only state included); None for layers with their own forward (timm's
    BatchNormAct2d) or already converted ones."""
    if isinstance(module, _GlobalBatchNormMixin) or type(module).forward is not _BatchNorm.forward:
        return None
    return next((g for base, g in _GLOBAL.items() if isinstance(module, base)), None)


class GlobalBatchNorm(LayerSync):
    """Lightning plugin: every BatchNorm1d/2d/3d of the model normalises with the global
    batch's statistics under DDP, on any backend (gloo on CPU included), so N processes train
    as one process holding the N batches would.

    ``simclr-lightning --trainer.sync_batchnorm true`` uses it; in Python pass
    ``L.Trainer(plugins=[GlobalBatchNorm()])`` (not together with ``sync_batchnorm=True``,
    which Lightning reserves for torch's CUDA-only SyncBatchNorm). It is used on CUDA with nccl
    too: one implementation, tested on every backend. Layers are converted in place (their
    class changes), so parameters, buffers, hooks and every reference to a layer stay the
    same objects, and :meth:`revert` gives back each layer's own class (``ScaleBatchNorm1d``
    included). BatchNorm subclasses with their own forward stay per-device, with a warning.
    """

    def apply(self, model: nn.Module) -> nn.Module:
        skipped = []
        for name, module in model.named_modules():
            target = _global_class(module)
            if target is not None:
                module._plain_class = type(module)
                module.__class__ = target
            elif isinstance(module, _BatchNorm) and not isinstance(module, _GlobalBatchNormMixin):
                skipped.append(f"{name} ({type(module).__name__})")
        if skipped:
            rank_zero_warn(
                "GlobalBatchNorm: these BatchNorm layers have their own forward and keep "
                f"per-device statistics: {', '.join(skipped)}"
            )
        return model

    def revert(self, model: nn.Module) -> nn.Module:
        for module in model.modules():
            if isinstance(module, _GlobalBatchNormMixin):
                module.__class__ = module.__dict__.pop("_plain_class")
        return model
