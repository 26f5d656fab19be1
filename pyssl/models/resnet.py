"""ResNet backbones built from torchvision's residual blocks.

``forward_features(x)`` returns ``{"pooled": [B, C], "patch": [B, h*w, C], "map": [B, C, h, w]}``
so that image-level protocols (linear probe, k-NN) read ``pooled`` and dense heads (inpainting
decoder, colorization) read ``map``.

For small images (``image_size <= 64``) the stem is a 3x3 stride-1 convolution without max-pool
(the CIFAR-style stem), so a 28-32 px image keeps a 4x4 map after the last stage; for larger
images it is torchvision's 7x7 stride-2 convolution + max-pool.
"""

from __future__ import annotations

import torch
from torch import nn
from torchvision.models import resnet as tv_resnet

__all__ = ["ResNet", "RESNET_DEPTHS"]

RESNET_DEPTHS = {
    10: (tv_resnet.BasicBlock, [1, 1, 1, 1]),
    18: (tv_resnet.BasicBlock, [2, 2, 2, 2]),
    34: (tv_resnet.BasicBlock, [3, 4, 6, 3]),
    50: (tv_resnet.Bottleneck, [3, 4, 6, 3]),
    101: (tv_resnet.Bottleneck, [3, 4, 23, 3]),
}


def _group_norm(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(min(32, channels // 4) if channels >= 8 else 1, channels)


class ResNet(nn.Module):
    """A ResNet trunk (no classifier) with a width multiplier and a small-image stem.

    Args:
        depth: 10, 18, 34, 50 or 101 (10 = one BasicBlock per stage, for CPU-sized runs).
        in_chans: input channels (1 for grayscale/L-channel, 3 for RGB).
        width: channels of the first stage (torchvision's ResNets use 64).
        small_stem: 3x3 stride-1 stem without max-pool (for 28-64 px images).
        norm: ``"batch"`` (torchvision default) or ``"group"`` (batch-independent, e.g. for
            tiny per-rank batches or exact multi-process equivalence).
    """

    def __init__(self, depth: int = 18, in_chans: int = 3, width: int = 64,
                 small_stem: bool = False, norm: str = "batch"):
        super().__init__()
        if depth not in RESNET_DEPTHS:
            raise ValueError(f"depth must be one of {sorted(RESNET_DEPTHS)}, got {depth}")
        if norm not in ("batch", "group"):
            raise ValueError(f"norm must be 'batch' or 'group', got {norm!r}")
        block, layers = RESNET_DEPTHS[depth]
        norm_layer = nn.BatchNorm2d if norm == "batch" else _group_norm
        self._norm_layer = norm_layer
        self.inplanes = width
        if small_stem:
            self.conv1 = nn.Conv2d(in_chans, width, 3, 1, 1, bias=False)
            self.maxpool = nn.Identity()
        else:
            self.conv1 = nn.Conv2d(in_chans, width, 7, 2, 3, bias=False)
            self.maxpool = nn.MaxPool2d(3, 2, 1)
        self.bn1 = norm_layer(width)
        self.relu = nn.ReLU(inplace=True)
        self.layer1 = self._make_layer(block, width, layers[0], 1)
        self.layer2 = self._make_layer(block, width * 2, layers[1], 2)
        self.layer3 = self._make_layer(block, width * 4, layers[2], 2)
        self.layer4 = self._make_layer(block, width * 8, layers[3], 2)
        self.num_features = width * 8 * block.expansion
        self.stage_channels = [width * m * block.expansion for m in (1, 2, 4, 8)]
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, (nn.BatchNorm2d, nn.GroupNorm)):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def _make_layer(self, block, planes: int, blocks: int, stride: int) -> nn.Sequential:
        downsample = None
        if stride != 1 or self.inplanes != planes * block.expansion:
            downsample = nn.Sequential(
                nn.Conv2d(self.inplanes, planes * block.expansion, 1, stride, bias=False),
                self._norm_layer(planes * block.expansion))
        layers = [block(self.inplanes, planes, stride, downsample, norm_layer=self._norm_layer)]
        self.inplanes = planes * block.expansion
        layers += [block(self.inplanes, planes, norm_layer=self._norm_layer)
                   for _ in range(1, blocks)]
        return nn.Sequential(*layers)

    def forward_stages(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Feature maps after each of the four stages (strides 1/2/4/8 with the small stem)."""
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        out = []
        for layer in (self.layer1, self.layer2, self.layer3, self.layer4):
            x = layer(x)
            out.append(x)
        return out

    def forward_features(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        fmap = self.forward_stages(x)[-1]
        return {"pooled": fmap.mean(dim=(2, 3)), "patch": fmap.flatten(2).transpose(1, 2),
                "map": fmap}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_features(x)["pooled"]
