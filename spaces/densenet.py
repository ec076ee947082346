"""The static DenseNet of a :class:`~dynas.spaces.backbones.BackboneSpec`, with torchvision's
module names, so ``model.load_state_dict(torchvision.models.densenet121().state_dict())`` works:

``features.conv0`` / ``norm0`` / ``relu0`` / ``pool0`` (stem), ``features.denseblock{s}`` (stages
numbered from 1) of ``denselayer{i}`` (from 1) with ``norm1``, ``relu1``, ``conv1`` (1x1 to
``width`` channels), ``norm2``, ``relu2``, ``conv2`` (3x3 to the growth rate), then
``features.transition{s}`` (``norm``, ``relu``, ``conv``, ``pool``) between dense blocks,
``features.norm5`` and the ``classifier`` (Linear).  Dropout (torchvision's ``drop_rate``, 0 by
default) and the memory-efficient checkpointing are left out: neither changes the parameters or
the inference output.
"""

from __future__ import annotations

from collections import OrderedDict

import torch
import torch.nn.functional as F
from torch import nn

from dynas.errors import ConfigError
from dynas.spaces.backbones import BackboneSpec, BlockSpec, transition_of

__all__ = ["DenseLayer", "DenseBlock", "Transition", "DenseNet"]


class DenseLayer(nn.Module):
    """BN-ReLU-1x1 conv to ``width`` channels, BN-ReLU-3x3 conv to ``out_channels`` new features."""

    def __init__(self, block: BlockSpec):
        super().__init__()
        if block.kind != "dense":
            raise ConfigError(f"block kind={block.kind!r} given to DenseLayer; allowed: dense")
        self.norm1 = nn.BatchNorm2d(block.in_channels)
        self.relu1 = nn.ReLU(inplace=True)
        self.conv1 = nn.Conv2d(block.in_channels, block.width, 1, bias=False)
        self.norm2 = nn.BatchNorm2d(block.width)
        self.relu2 = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(block.width, block.out_channels, 3, padding=1, bias=False)

    def forward(self, features: "torch.Tensor | list[torch.Tensor]") -> torch.Tensor:
        """The features so far (a list, concatenated here, or one tensor [N, C_in, H, W]) -> new [N, k, H, W]."""
        x = torch.cat(features, 1) if isinstance(features, (list, tuple)) else features
        h = self.conv1(self.relu1(self.norm1(x)))  # [N, width, H, W]
        return self.conv2(self.relu2(self.norm2(h)))  # [N, k, H, W]


class DenseBlock(nn.ModuleDict):
    """Dense layers ``denselayer1..L``; each reads the concatenation of the input and all new features before it."""

    def __init__(self, blocks: tuple[BlockSpec, ...]):
        super().__init__(OrderedDict((f"denselayer{b.index + 1}", DenseLayer(b)) for b in blocks))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        features = [x]
        for layer in self.values():
            features.append(layer(features))
        return torch.cat(features, 1)  # [N, C_in + L * k, H, W]


class Transition(nn.Sequential):
    """BN-ReLU-1x1 conv to ``c_out`` channels, 2x2 average pool with stride 2."""

    def __init__(self, c_in: int, c_out: int):
        super().__init__(
            OrderedDict(
                [
                    ("norm", nn.BatchNorm2d(c_in)),
                    ("relu", nn.ReLU(inplace=True)),
                    ("conv", nn.Conv2d(c_in, c_out, 1, bias=False)),
                    ("pool", nn.AvgPool2d(kernel_size=2, stride=2)),
                ]
            )
        )


class DenseNet(nn.Module):
    """DenseNet-BC built from a spec; torchvision module names."""

    def __init__(self, spec: BackboneSpec):
        super().__init__()
        self.spec = spec
        st = spec.stem
        layers: OrderedDict[str, nn.Module] = OrderedDict(
            [
                ("conv0", nn.Conv2d(st.in_channels, st.out_channels, st.kernel, st.stride, st.padding, bias=False)),
                ("norm0", nn.BatchNorm2d(st.out_channels)),
                ("relu0", nn.ReLU(inplace=True)),
                ("pool0", nn.MaxPool2d(kernel_size=3, stride=2, padding=1)),
            ]
        )
        for s in range(spec.num_stages):
            blocks = spec.stage_blocks(s)
            layers[f"denseblock{s + 1}"] = DenseBlock(blocks)
            if blocks[-1].has_downsample:
                c_in, c_out, _ = transition_of(blocks[-1])
                layers[f"transition{s + 1}"] = Transition(c_in, c_out)
        layers["norm5"] = nn.BatchNorm2d(spec.head_in)
        self.features = nn.Sequential(layers)
        self.classifier = nn.Linear(spec.head_in, spec.num_classes)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """[N, 3, H, W] -> last stage map after norm5 [N, C_last, h, w] (before the ReLU)."""
        return self.features(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.forward_features(x), inplace=True)
        out = F.adaptive_avg_pool2d(out, (1, 1))  # [N, C, 1, 1]
        return self.classifier(torch.flatten(out, 1))  # [N, C] -> [N, num_classes]
