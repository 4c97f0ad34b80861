"""The networks the project trains, built by name.

Knows nothing of Kedro. ``build_model(name, num_classes)`` looks ``name`` up in
``MODELS`` (name -> builder) and returns a freshly initialised ``nn.Module``
taking normalised ``N x 3 x 32 x 32`` float input (see ``images.to_model_input``)
and returning ``N x num_classes`` logits. All weights come from torch's global
random state, so ``torch.manual_seed`` before a build makes it reproducible.

Every model uses BatchNorm: the paper's gradient probe (``net_compare``) runs in
training mode, with batch statistics, and the training loop copies BN buffers
between the trained and the probing network.

Adding a model is one builder function and one ``MODELS`` entry in this file;
see ``docs/adding_a_model.md``.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from torchvision.models.resnet import BasicBlock, ResNet

#: The parameter that chooses the model in the training pipeline's configuration.
MODEL_PARAMETER = "gradient_training.model.name"

ModelBuilder = Callable[..., nn.Module]


# --------------------------------------------------------------------------- small_cnn


def _conv_bn_relu(in_channels: int, out_channels: int, stride: int) -> list[nn.Module]:
    # No conv bias: the following BatchNorm's shift makes it redundant.
    return [
        nn.Conv2d(in_channels, out_channels, kernel_size=3, stride=stride, padding=1, bias=False),
        nn.BatchNorm2d(out_channels),
        nn.ReLU(inplace=True),
    ]


def small_cnn(num_classes: int = 10, width: int = 16) -> nn.Module:
    """The CPU default: four 3x3 conv + BN + ReLU blocks, global average pool, linear head.

    Channels ``width, 2*width, 4*width, 4*width``; the first three convs have
    stride 2 (32 -> 16 -> 8 -> 4 pixels), so most of the work happens on small
    feature maps, which is what makes it fast on two CPU threads. ``width=16``
    has 61,338 parameters for 10 classes.
    """
    if not isinstance(width, int) or isinstance(width, bool) or width < 1:
        raise ValueError(f"small_cnn: width must be a positive integer, got {width!r}.")
    c1, c2, c3 = width, 2 * width, 4 * width
    return nn.Sequential(
        *_conv_bn_relu(3, c1, stride=2),
        *_conv_bn_relu(c1, c2, stride=2),
        *_conv_bn_relu(c2, c3, stride=2),
        *_conv_bn_relu(c3, c3, stride=1),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(c3, num_classes),
    )


# --------------------------------------------------------------------------- resnet18


def resnet18(num_classes: int = 10) -> nn.Module:
    """ResNet-18 in its CIFAR form (11,173,962 parameters for 10 classes).

    torchvision's ResNet with BasicBlocks ``[2, 2, 2, 2]`` (64/128/256/512 planes,
    1x1 conv + BN projection shortcuts where the shape changes), with the
    ImageNet stem (7x7 stride-2 conv, max pool) replaced by one 3x3 stride-1 conv,
    so 32x32 input reaches the last stage as 4x4 maps.
    """
    model = ResNet(BasicBlock, [2, 2, 2, 2], num_classes=num_classes)
    model.conv1 = nn.Conv2d(3, 64, kernel_size=3, stride=1, padding=1, bias=False)
    # Same initialisation torchvision gives every other conv of the network.
    nn.init.kaiming_normal_(model.conv1.weight, mode="fan_out", nonlinearity="relu")
    model.maxpool = nn.Identity()
    return model


# --------------------------------------------------------------------------- dpn92


class DualPathBlock(nn.Module):
    """One DPN bottleneck: a residual path (added) and a densely connected path (concatenated).

    1x1 conv -> grouped 3x3 conv -> 1x1 conv to ``out_planes + dense_depth``
    channels, each followed by BN (ReLU after the first two). The first
    ``out_planes`` output channels are added to the shortcut's first
    ``out_planes``; the remaining ``dense_depth`` channels are appended to the
    shortcut's dense channels. Output channels: ``in_channels + dense_depth``
    without projection, ``out_planes + 2 * dense_depth`` with it.
    """

    def __init__(
        self,
        in_channels: int,
        bottleneck_planes: int,
        out_planes: int,
        dense_depth: int,
        stride: int,
        groups: int,
        project: bool,
    ) -> None:
        super().__init__()
        self.out_planes = out_planes
        produced = out_planes + dense_depth
        self.reduce = nn.Sequential(
            nn.Conv2d(in_channels, bottleneck_planes, kernel_size=1, bias=False),
            nn.BatchNorm2d(bottleneck_planes),
            nn.ReLU(inplace=True),
        )
        self.grouped = nn.Sequential(
            nn.Conv2d(
                bottleneck_planes,
                bottleneck_planes,
                kernel_size=3,
                stride=stride,
                padding=1,
                groups=groups,
                bias=False,
            ),
            nn.BatchNorm2d(bottleneck_planes),
            nn.ReLU(inplace=True),
        )
        self.expand = nn.Sequential(
            nn.Conv2d(bottleneck_planes, produced, kernel_size=1, bias=False),
            nn.BatchNorm2d(produced),
        )
        # The first block of a stage changes resolution and width: project the input.
        self.shortcut: nn.Module = (
            nn.Sequential(
                nn.Conv2d(in_channels, produced, kernel_size=1, stride=stride, bias=False),
                nn.BatchNorm2d(produced),
            )
            if project
            else nn.Identity()
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.expand(self.grouped(self.reduce(x)))
        skip = self.shortcut(x)
        d = self.out_planes
        merged = torch.cat([skip[:, :d] + out[:, :d], skip[:, d:], out[:, d:]], dim=1)
        return torch.relu(merged)


class DPN(nn.Module):
    """Dual Path Network (Chen et al., 2017) for 32x32 input: 3x3 stem, four stages, linear head."""

    def __init__(
        self,
        bottleneck_planes: tuple[int, ...],
        out_planes: tuple[int, ...],
        blocks: tuple[int, ...],
        dense_depth: tuple[int, ...],
        strides: tuple[int, ...] = (1, 2, 2, 2),
        groups: int = 32,
        stem_channels: int = 64,
        num_classes: int = 10,
    ) -> None:
        super().__init__()
        self.stem = nn.Sequential(*_conv_bn_relu(3, stem_channels, stride=1))
        channels = stem_channels
        stages = []
        for planes, out, count, dense, stride in zip(
            bottleneck_planes, out_planes, blocks, dense_depth, strides, strict=True
        ):
            stage = []
            for i in range(count):
                stage.append(
                    DualPathBlock(
                        channels,
                        planes,
                        out,
                        dense,
                        stride=stride if i == 0 else 1,
                        groups=groups,
                        project=i == 0,
                    )
                )
                channels = out + (i + 2) * dense
            stages.append(nn.Sequential(*stage))
        self.stages = nn.Sequential(*stages)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(channels, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        features = self.pool(self.stages(self.stem(x)))
        return self.classifier(torch.flatten(features, 1))


def dpn92(num_classes: int = 10) -> nn.Module:
    """DPN-92 in the CIFAR-10 form the paper trains (34,236,634 parameters for 10 classes).

    Stages (bottleneck, out) planes (96, 256), (192, 512), (384, 1024), (768, 2048),
    blocks (3, 4, 20, 3), dense depth (16, 32, 24, 128), strides (1, 2, 2, 2),
    32 groups in the 3x3 convs; 32x32 input ends as 4x4 maps of 2,560 channels.
    """
    return DPN(
        bottleneck_planes=(96, 192, 384, 768),
        out_planes=(256, 512, 1024, 2048),
        blocks=(3, 4, 20, 3),
        dense_depth=(16, 32, 24, 128),
        num_classes=num_classes,
    )


# --------------------------------------------------------------------------- registry

MODELS: dict[str, ModelBuilder] = {
    "small_cnn": small_cnn,
    "resnet18": resnet18,
    "dpn92": dpn92,
}


def build_model(name: str, num_classes: int = 10, **options: Any) -> nn.Module:
    """A freshly initialised model registered in ``MODELS`` under ``name``.

    ``options`` go to the builder (e.g. ``width`` for ``small_cnn``). Raises
    ``ValueError`` naming the problem and the parameter to fix for an unknown
    name, a bad class count or an option the builder does not take.
    """
    if name not in MODELS:
        raise ValueError(
            f"Unknown model {name!r}. Known models: {', '.join(sorted(MODELS))}. "
            f"Set {MODEL_PARAMETER} to one of them (or register a new builder in "
            "best_minibatch.models.MODELS)."
        )
    if not isinstance(num_classes, int) or isinstance(num_classes, bool) or num_classes < 1:
        raise ValueError(f"num_classes must be a positive integer, got {num_classes!r}.")
    builder = MODELS[name]
    accepted = set(inspect.signature(builder).parameters) - {"num_classes"}
    unknown = sorted(set(options) - accepted)
    if unknown:
        raise ValueError(
            f"Model {name!r} does not take option(s) {unknown}; it takes "
            f"{sorted(accepted) or 'no options'}. Fix the options given alongside {MODEL_PARAMETER}."
        )
    return builder(num_classes=num_classes, **options)


def count_parameters(model: nn.Module) -> int:
    """The number of trainable parameters (BatchNorm running statistics are buffers, not counted)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
