"""Small building blocks shared by the convolutional encoders (GroupNorm only, Opacus-safe)."""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["ConvEncoder", "group_norm"]

# BatchNorm mixes samples of a batch, which breaks per-sample gradients (DP-SGD) and lets a
# masked-out sample change its neighbours' outputs; GroupNorm normalises each sample alone.
_MAX_GROUPS = 8


def group_norm(channels: int) -> nn.GroupNorm:
    """Return a GroupNorm with the largest group count ≤ 8 that divides ``channels``.

    Parameters
    ----------
    channels : int
        Number of channels to normalise.

    Returns
    -------
    nn.GroupNorm
        The normalisation layer.
    """
    groups = max(g for g in range(1, _MAX_GROUPS + 1) if channels % g == 0)
    return nn.GroupNorm(groups, channels)


POOL_GRID = (3, 3)


class ConvEncoder(nn.Module):
    """Conv-GroupNorm-ReLU blocks with 2×2 pooling, a 3×3 average-pooled grid, projection.

    Parameters
    ----------
    width : int
        Channels of the first block; each further block doubles them.
    blocks : int
        Number of blocks (each halves height and width).
    embed_dim : int
        Size of the output embedding.
    dropout : float
        Dropout probability before the projection.
    stem_stride : int
        Stride of the very first convolution; 2 quarters the cost of every block on
        large inputs such as spectrograms.

    Raises
    ------
    ValueError
        If a size is not positive or ``dropout`` is outside [0, 1).
    """

    def __init__(
        self, *, width: int, blocks: int, embed_dim: int, dropout: float, stem_stride: int = 1
    ) -> None:
        super().__init__()
        if width < 1 or blocks < 1 or embed_dim < 1:
            raise ValueError(
                f"width, blocks and embed_dim must be >= 1, found {width}, {blocks}, {embed_dim}."
            )
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must lie in [0, 1), found {dropout}.")
        # No in-place activations: Opacus keeps references to layer inputs to compute
        # per-sample gradients, and an in-place op would overwrite them.
        layers: list[nn.Module] = []
        in_channels = 1
        for index in range(blocks):
            out_channels = width * 2**index
            layers += [
                nn.Conv2d(
                    in_channels, out_channels, kernel_size=3, padding=1,
                    stride=stem_stride if index == 0 else 1,
                ),
                group_norm(out_channels),
                nn.ReLU(),
                nn.Conv2d(out_channels, out_channels, kernel_size=3, padding=1),
                group_norm(out_channels),
                nn.ReLU(),
                nn.MaxPool2d(2, ceil_mode=True),
            ]
            in_channels = out_channels
        self.features = nn.Sequential(*layers)
        # A coarse grid, not a global average: where a feature sits (mouth vs brows,
        # low vs high frequencies) is the emotion cue; global pooling throws it away
        # and the encoders then learn several times more slowly.
        self.pool = nn.AdaptiveAvgPool2d(POOL_GRID)
        self.dropout = nn.Dropout(dropout)
        self.proj = nn.Linear(in_channels * POOL_GRID[0] * POOL_GRID[1], embed_dim)
        # Each encoder ends in LayerNorm so face, voice and text embeddings arrive at the
        # fusion on one scale, whatever their backbone.
        self.norm = nn.LayerNorm(embed_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Encode ``x`` of shape (B, 1, H, W) into (B, embed_dim)."""
        h = self.features(x)  # (B, C, H / (stem_stride * 2**blocks), W / ...)
        h = self.pool(h).flatten(1)  # (B, C * 3 * 3)
        return self.norm(self.proj(self.dropout(h)))  # (B, E)
