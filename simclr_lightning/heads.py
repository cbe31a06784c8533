"""The projection head g(.) that maps encoder features to the space the loss works in."""

from __future__ import annotations

from torch import Tensor, nn

from simclr_lightning.errors import require

# google-research/simclr model_util.linear_layer: dense kernels drawn from N(0, 0.01^2)
HEAD_INIT_STD = 0.01


class ScaleBatchNorm1d(nn.BatchNorm1d):
    """BatchNorm with a learned scale and no shift: the official head's last layer
    (``batch_norm(center=False)``), so the output has no bias of its own."""

    def __init__(self, num_features: int) -> None:
        super().__init__(num_features, affine=True)
        self.register_parameter("bias", None)


class ProjectionHead(nn.Module):
    """SimCLR's MLP head as google-research/simclr builds it (``model_util.projection_head``).

    Every layer is a Linear without bias followed by BatchNorm: the hidden layers' BN has scale
    and shift and is followed by ReLU; the output layer's BN has a scale only
    (``output_bn=False`` drops it, as 0.1 of this library did). Linear weights start from
    N(0, 0.01^2). ``num_layers`` 2 is SimCLR v1's head, 3 is v2's. Layer ``k`` of the head is
    what SimCLR v2 fine-tunes from: :meth:`first_layers` returns it.
    """

    def __init__(
        self,
        input_dim: int,
        hidden_dim: int = 2048,
        output_dim: int = 128,
        num_layers: int = 2,
        output_bn: bool = True,
    ) -> None:
        super().__init__()
        require(num_layers >= 1, "model.head_layers", num_layers, ">= 1")
        require(hidden_dim >= 1, "model.head_hidden_dim", hidden_dim, ">= 1")
        require(output_dim >= 1, "model.head_output_dim", output_dim, ">= 1")
        self.num_layers = num_layers
        layers: list[nn.Module] = []
        width = input_dim
        for _ in range(num_layers - 1):
            layers += [nn.Linear(width, hidden_dim, bias=False), nn.BatchNorm1d(hidden_dim)]
            layers.append(nn.ReLU(inplace=True))
            width = hidden_dim
        layers.append(nn.Linear(width, output_dim, bias=not output_bn))
        if output_bn:
            layers.append(ScaleBatchNorm1d(output_dim))
        self.net = nn.Sequential(*layers)
        for layer in self.net:
            if isinstance(layer, nn.Linear):
                nn.init.normal_(layer.weight, std=HEAD_INIT_STD)
                if layer.bias is not None:
                    nn.init.zeros_(layer.bias)
        self.output_dim = output_dim
        self.hidden_dim = hidden_dim
        # the arguments that rebuild this head (stored by checkpoints that keep some layers)
        self.config = dict(
            input_dim=input_dim,
            hidden_dim=hidden_dim,
            output_dim=output_dim,
            num_layers=num_layers,
            output_bn=output_bn,
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)

    def first_layers(self, k: int) -> nn.Sequential:
        """The first ``k`` layers (sharing their parameters), each Linear -> BN (-> ReLU): the
        input of SimCLR v2's fine-tuning (``ft_proj_selector``). Keys keep ``net``'s indices."""
        require(0 <= k <= self.num_layers, "model.head_layers", k, f"in [0, {self.num_layers}]")
        if k == self.num_layers:
            return nn.Sequential(*self.net)
        return nn.Sequential(*list(self.net)[: 3 * k])  # hidden layers are Linear, BN, ReLU

    def width_after(self, k: int) -> int:
        """Feature width after the first ``k`` layers (``k`` = 0: the encoder's)."""
        if k == 0:
            return self.net[0].in_features
        return self.output_dim if k == self.num_layers else self.hidden_dim
