"""The static backbone of a :class:`~dynas.spaces.backbones.BackboneSpec` in plain PyTorch.

This is the dense reference that FLOP counting and later kernel work compare against.  Every
layer is built from the spec (no per-model lists here), and module names and parameter shapes
follow torchvision, so ``model.load_state_dict(torchvision_model.state_dict())`` works for the
backbones both know:

* ResNet (v1.5, stride on the 3x3 conv): ``conv1``/``bn1``/``relu``/``maxpool`` stem,
  ``layer1`` .. ``layer4`` of blocks with ``conv1``..``conv3``, ``bn1``..``bn3`` and
  ``downsample.0`` (1x1 conv) / ``downsample.1`` (BN), then ``avgpool`` and ``fc``.
* RegNetY: ``stem.0``/``stem.1``/``stem.2`` (3x3 conv, BN, ReLU), then
  ``trunk_output.block{s}.block{s}-{i}`` (stages numbered from 1) with ``proj`` (1x1 conv + BN
  shortcut) and ``f.a`` (1x1), ``f.b`` (grouped 3x3), ``f.se`` (``fc1``/``fc2`` 1x1 convs with
  bias, ReLU then sigmoid), ``f.c`` (1x1, no activation), then ``avgpool`` and ``fc``.  RegNetX
  is the same without ``f.se``.
* DenseNet: ``features.*`` and ``classifier``, see :mod:`dynas.spaces.densenet`; a dense
  layer's ops are ``conv1`` and ``conv2``, and the ``downsample`` of a dense block's last layer
  is the transition after it (``features.transition{s}``).

:func:`module_name_for` maps a block's operator (``conv1``, ``conv2``, ``conv3``,
``downsample``, ``se``) to the module path, so that per-module results (FLOP counts, hooks,
weights) can be looked up per operator.  Build on the meta device for shape/FLOP work::

    with torch.device("meta"):
        model = build_static_model(get_backbone("resnet50"))
"""

from __future__ import annotations

from collections import OrderedDict

import torch
from torch import nn

from dynas.errors import ConfigError
from dynas.spaces.backbones import BackboneSpec, BlockSpec

__all__ = [
    "OPS",
    "build_static_model",
    "init_weights",
    "block_ops",
    "module_name_for",
    "block_module_name",
    "stem_module_names",
    "head_module_names",
    "replace_classifier",
    "ResNet",
    "RegNetY",
    "BasicBlock",
    "Bottleneck",
    "RegNetYBlock",
    "SqueezeExcitation",
]

#: operator names of a residual block, in execution order
OPS: tuple[str, ...] = ("conv1", "conv2", "se", "conv3", "downsample")


# ----------------------------------------------------------------------------- naming


def block_ops(block: BlockSpec) -> tuple[str, ...]:
    """Operators that ``block`` has, in execution order (a subset of :data:`OPS`)."""
    if block.kind == "basic":
        ops: tuple[str, ...] = ("conv1", "conv2")
    elif block.kind == "bottleneck":
        ops = ("conv1", "conv2", "conv3")
    elif block.kind == "regnety":
        ops = ("conv1", "conv2", "se", "conv3") if block.se_channels > 0 else ("conv1", "conv2", "conv3")
    elif block.kind == "dense":
        ops = ("conv1", "conv2")
    else:
        raise ConfigError(f"block kind={block.kind!r} is unknown; allowed: basic, bottleneck, regnety, dense")
    return ops + (("downsample",) if block.has_downsample else ())


def block_module_name(block: BlockSpec) -> str:
    """Path of the module that is the whole block, e.g. ``layer1.0``."""
    s = block.stage + 1
    if block.kind == "regnety":
        return f"trunk_output.block{s}.block{s}-{block.index}"
    if block.kind == "dense":
        return f"features.denseblock{s}.denselayer{block.index + 1}"
    return f"layer{s}.{block.index}"


_RESNET_OP_MODULES = {"conv1": "conv1", "conv2": "conv2", "conv3": "conv3", "downsample": "downsample"}
# Conv + BN (+ activation) containers of a RegNetY block; their FLOPs are the conv's.
_REGNETY_OP_MODULES = {"conv1": "f.a", "conv2": "f.b", "se": "f.se", "conv3": "f.c", "downsample": "proj"}


def module_name_for(block: BlockSpec, op: str) -> str:
    """Path of the module that computes operator ``op`` of ``block``.

    ResNet ops map to the conv itself (``layer2.0.conv2``; ``downsample`` is the conv+BN
    ``Sequential``), RegNetY ops to torchvision's conv+BN(+act) containers
    (``trunk_output.block2.block2-0.f.b``).  Raises :class:`ConfigError` when the block has no
    such operator.
    """
    ops = block_ops(block)
    if op not in ops:
        raise ConfigError(f"op={op!r} does not exist in {block.kind} block {block.name}; allowed: {', '.join(ops)}")
    if block.kind == "dense" and op == "downsample":
        return f"features.transition{block.stage + 1}"
    table = _REGNETY_OP_MODULES if block.kind == "regnety" else _RESNET_OP_MODULES
    return f"{block_module_name(block)}.{table[op]}"


def stem_module_names(spec: BackboneSpec) -> tuple[str, ...]:
    """Top-level modules that make up the stem (FLOPs of the stem = sum over these)."""
    if spec.family == "densenet":
        return ("features.conv0", "features.norm0", "features.relu0", "features.pool0")
    return ("stem",) if spec.family == "regnety" else ("conv1", "bn1", "relu", "maxpool")


def head_module_names(spec: BackboneSpec) -> tuple[str, ...]:
    """Top-level modules that make up the classifier head."""
    return ("features.norm5", "classifier") if spec.family == "densenet" else ("avgpool", "fc")


def replace_classifier(model: nn.Module, num_classes: int) -> nn.Module:
    """Give ``model`` (a static or dynamic network of any family) a fresh classifier for
    ``num_classes`` classes: ``fc``, or DenseNet's ``classifier``; returns the new layer."""
    name = "classifier" if model.spec.family == "densenet" else "fc"
    layer = nn.Linear(getattr(model, name).in_features, num_classes)
    setattr(model, name, layer)
    return layer


# ----------------------------------------------------------------------------- layers


def _conv(c_in: int, c_out: int, kernel: int, stride: int = 1, groups: int = 1) -> nn.Conv2d:
    # "same"-style padding for odd kernels; no bias because a BN follows every conv here.
    return nn.Conv2d(c_in, c_out, kernel, stride=stride, padding=kernel // 2, groups=groups, bias=False)


class _ConvNormAct(nn.Sequential):
    """``0``: conv, ``1``: BN, ``2``: ReLU (optional) -- torchvision's Conv2dNormActivation layout."""

    def __init__(self, c_in: int, c_out: int, kernel: int, stride: int = 1, groups: int = 1, act: bool = True):
        layers: list[nn.Module] = [_conv(c_in, c_out, kernel, stride, groups), nn.BatchNorm2d(c_out)]
        if act:
            layers.append(nn.ReLU(inplace=True))
        super().__init__(*layers)


def _downsample(block: BlockSpec) -> nn.Sequential | None:
    if not block.has_downsample:
        return None
    return _ConvNormAct(block.in_channels, block.out_channels, 1, block.stride, act=False)


class BasicBlock(nn.Module):
    """3x3 (stride) -> 3x3, identity or 1x1 downsample shortcut."""

    def __init__(self, block: BlockSpec):
        super().__init__()
        if block.kind != "basic":
            raise ConfigError(f"block kind={block.kind!r} given to BasicBlock; allowed: basic")
        self.conv1 = _conv(block.in_channels, block.width, 3, block.stride)
        self.bn1 = nn.BatchNorm2d(block.width)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = _conv(block.width, block.out_channels, 3)
        self.bn2 = nn.BatchNorm2d(block.out_channels)
        self.downsample = _downsample(block)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + identity)


class Bottleneck(nn.Module):
    """1x1 -> 3x3 (stride, v1.5) -> 1x1, identity or 1x1 downsample shortcut."""

    def __init__(self, block: BlockSpec):
        super().__init__()
        if block.kind != "bottleneck":
            raise ConfigError(f"block kind={block.kind!r} given to Bottleneck; allowed: bottleneck")
        self.conv1 = _conv(block.in_channels, block.width, 1)
        self.bn1 = nn.BatchNorm2d(block.width)
        self.conv2 = _conv(block.width, block.width, 3, block.stride, block.groups)
        self.bn2 = nn.BatchNorm2d(block.width)
        self.conv3 = _conv(block.width, block.out_channels, 1)
        self.bn3 = nn.BatchNorm2d(block.out_channels)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = _downsample(block)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + identity)


class SqueezeExcitation(nn.Module):
    """Global average pool -> 1x1 conv (ReLU) -> 1x1 conv (sigmoid) -> scale the input channels."""

    def __init__(self, channels: int, squeeze_channels: int):
        super().__init__()
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc1 = nn.Conv2d(channels, squeeze_channels, 1)
        self.fc2 = nn.Conv2d(squeeze_channels, channels, 1)
        self.activation = nn.ReLU()
        self.scale_activation = nn.Sigmoid()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: [N, C, H, W] -> scale: [N, C, 1, 1], broadcast over H, W
        scale = self.scale_activation(self.fc2(self.activation(self.fc1(self.avgpool(x)))))
        return x * scale


class RegNetYBlock(nn.Module):
    """RegNetY residual block: ``f`` = 1x1 -> grouped 3x3 (stride) -> SE -> 1x1; ``proj`` shortcut."""

    def __init__(self, block: BlockSpec):
        super().__init__()
        if block.kind != "regnety":
            raise ConfigError(f"block kind={block.kind!r} given to RegNetYBlock; allowed: regnety")
        self.proj = _downsample(block)
        f: OrderedDict[str, nn.Module] = OrderedDict()
        f["a"] = _ConvNormAct(block.in_channels, block.width, 1)
        f["b"] = _ConvNormAct(block.width, block.width, 3, block.stride, block.groups)
        if block.se_channels > 0:
            # the squeeze width comes from the block *input* width (spec.se_channels), as in torchvision
            f["se"] = SqueezeExcitation(block.width, block.se_channels)
        f["c"] = _ConvNormAct(block.width, block.out_channels, 1, act=False)
        self.f = nn.Sequential(f)
        self.activation = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = x if self.proj is None else self.proj(x)
        return self.activation(shortcut + self.f(x))


# ----------------------------------------------------------------------------- networks


def init_weights(model: nn.Module) -> None:
    """torchvision's initialisation: Kaiming-normal convs, unit BN, small-normal linear layers."""
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, mean=0.0, std=0.01)
            nn.init.zeros_(m.bias)


class ResNet(nn.Module):
    """ResNet v1.5 built from a spec; torchvision module names."""

    def __init__(self, spec: BackboneSpec):
        super().__init__()
        self.spec = spec
        st = spec.stem
        self.conv1 = nn.Conv2d(st.in_channels, st.out_channels, st.kernel, st.stride, st.padding, bias=False)
        self.bn1 = nn.BatchNorm2d(st.out_channels)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1) if st.maxpool else nn.Identity()
        block_cls = {"basic": BasicBlock, "bottleneck": Bottleneck}
        for s in range(spec.num_stages):
            layer = nn.Sequential(*(block_cls[b.kind](b) for b in spec.stage_blocks(s)))
            self.add_module(f"layer{s + 1}", layer)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(spec.head_in, spec.num_classes)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """[N, 3, H, W] -> last stage map [N, C_last, h, w]."""
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        for s in range(self.spec.num_stages):
            x = getattr(self, f"layer{s + 1}")(x)
        return x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.avgpool(self.forward_features(x))  # [N, C, 1, 1]
        return self.fc(torch.flatten(x, 1))  # [N, C] -> [N, num_classes]


class RegNetY(nn.Module):
    """RegNetY built from a spec; torchvision module names."""

    def __init__(self, spec: BackboneSpec):
        super().__init__()
        self.spec = spec
        st = spec.stem
        self.stem = nn.Sequential(
            nn.Conv2d(st.in_channels, st.out_channels, st.kernel, st.stride, st.padding, bias=False),
            nn.BatchNorm2d(st.out_channels),
            nn.ReLU(inplace=True),
        )
        stages: OrderedDict[str, nn.Module] = OrderedDict()
        for s in range(spec.num_stages):
            name = f"block{s + 1}"
            blocks = OrderedDict((f"{name}-{b.index}", RegNetYBlock(b)) for b in spec.stage_blocks(s))
            stages[name] = nn.Sequential(blocks)
        self.trunk_output = nn.Sequential(stages)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(spec.head_in, spec.num_classes)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """[N, 3, H, W] -> last stage map [N, C_last, h, w]."""
        return self.trunk_output(self.stem(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.avgpool(self.forward_features(x))  # [N, C, 1, 1]
        return self.fc(torch.flatten(x, 1))  # [N, C] -> [N, num_classes]


def build_static_model(spec: BackboneSpec, *, device: torch.device | str | None = None) -> nn.Module:
    """The dense backbone described by ``spec`` (eval-ready, freshly initialised).

    ``device="meta"`` (or building inside ``with torch.device("meta")``) allocates no memory;
    that is what shape and FLOP analysis use.
    """
    if spec.family == "resnet":
        cls: type[nn.Module] = ResNet
    elif spec.family == "regnety":
        cls = RegNetY
    elif spec.family == "densenet":
        from dynas.spaces.densenet import DenseNet

        cls = DenseNet
    else:
        raise ConfigError(f"backbone family={spec.family!r} is unknown; allowed: resnet, regnety, densenet")
    if device is None:
        model = cls(spec)
    else:
        with torch.device(device):
            model = cls(spec)
    if next(model.parameters()).device.type != "meta":
        init_weights(model)
    return model
