"""The projection head g(.) that maps encoder features to the space the loss works in."""

from __future__ import annotations

from torch import Tensor, nn

from simclr_lightning.errors import require


class ProjectionHead(nn.Module):
    """MLP with BatchNorm: 2 layers as in SimCLR v1, 3 as in SimCLR v2.

    Hidden layers are Linear (no bias: BN follows) -> BN -> ReLU; the output layer is a
    plain Linear, optionally followed by a BN without affine parameters (SimCLR v2's code).
    """

    def __init__(
        self,
        input_dim: int,
        hidden_dim: int = 2048,
        output_dim: int = 128,
        num_layers: int = 2,
        output_bn: bool = False,
    ) -> None:
        super().__init__()
        require(num_layers >= 1, "model.head_layers", num_layers, ">= 1")
        require(hidden_dim >= 1, "model.head_hidden_dim", hidden_dim, ">= 1")
        require(output_dim >= 1, "model.head_output_dim", output_dim, ">= 1")
        layers: list[nn.Module] = []
        width = input_dim
        for _ in range(num_layers - 1):
            layers += [nn.Linear(width, hidden_dim, bias=False), nn.BatchNorm1d(hidden_dim)]
            layers.append(nn.ReLU(inplace=True))
            width = hidden_dim
        layers.append(nn.Linear(width, output_dim, bias=not output_bn))
        if output_bn:
            layers.append(nn.BatchNorm1d(output_dim, affine=False))
        self.net = nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)
