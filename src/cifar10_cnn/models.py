"""CIFAR-10 architectures and a small registry: create_model("seed_cnn"), create_model("resnet18"), ...

Every model takes normalised float images (B, 3, S, S) and returns logits (B, num_classes). S is 32 for
CIFAR, or a folder's --image-size: the nets that end in adaptive pooling (airbench, airbench_small, resnet9,
resnet18) run on any side from their minimum; seed_cnn and vgg11 flatten their last feature map into a linear
layer, which create_model sizes for image_size (so a model file holds the size it was built for).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from .constants import IMAGE_SIZE, MIN_IMAGE_SIZE
from .errors import UserError

_REGISTRY: dict[str, Callable[..., nn.Module]] = {}
# The smallest side each net runs on, where it is above MIN_IMAGE_SIZE (measured: tests/test_image_size.py):
# airbench's 2x2 whitening conv takes a pixel before three 2x2 max-pools; vgg11 pools five times.
_MIN_SIZE = {"airbench": 9, "airbench_small": 9, "vgg11": 32}


def register(fn: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
    """Add a model factory to the registry under its function name."""
    _REGISTRY[fn.__name__] = fn
    return fn


def list_models() -> list[str]:
    return sorted(_REGISTRY)


def check_model_name(name: str) -> None:
    """A UserError naming the known models unless name is one of them."""
    if name not in _REGISTRY:
        raise UserError(f"unknown model {name!r}; known models: {', '.join(list_models())}")


def min_image_size(name: str) -> int:
    """The smallest side of the images a registered net runs on."""
    return _MIN_SIZE.get(name, MIN_IMAGE_SIZE)


def check_image_size(name: str, image_size: int) -> None:
    """A UserError naming the nets that take this size, unless model name runs on image_size x image_size."""
    check_model_name(name)
    if image_size < min_image_size(name):
        fits = [m for m in list_models() if min_image_size(m) <= image_size]
        raise UserError(
            f"{name} takes images of at least {min_image_size(name)}x{min_image_size(name)} pixels, not "
            f"{image_size}x{image_size}; at that size use --model {', '.join(fits)} (or a larger --image-size)"
        )


def create_model(name: str, num_classes: int = 10, image_size: int = IMAGE_SIZE, **kwargs) -> nn.Module:
    """Build a registered architecture by name, for square images of image_size (see check_image_size)."""
    check_image_size(name, image_size)
    return _REGISTRY[name](num_classes=num_classes, image_size=image_size, **kwargs)


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


# --- the classic CNN ------------------------------------------------------------------------------------


class SeedCNN(nn.Module):
    """Three conv 3x3 layers (32/64/128), each ReLU + 2x2 max-pool, then FC 2048->512->10 (at 32x32: the FC
    layer reads the 128 (S/8)x(S/8) maps of S x S images)."""

    def __init__(self, num_classes: int = 10, image_size: int = IMAGE_SIZE):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 32, 3, padding=1),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(2),
            nn.Conv2d(32, 64, 3, padding=1),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(2),
            nn.Conv2d(64, 128, 3, padding=1),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(2),
        )
        self.classifier = nn.Sequential(
            nn.Flatten(),
            nn.Linear(128 * (image_size // 8) ** 2, 512),
            nn.ReLU(inplace=True),
            nn.Linear(512, num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


@register
def seed_cnn(num_classes: int = 10, image_size: int = IMAGE_SIZE) -> nn.Module:
    """The classic CIFAR-10 CNN: 3 conv layers 32/64/128 with max-pool, FC 512, FC 10 (1.1M params at 32x32)."""
    return SeedCNN(num_classes, image_size)


# --- VGG ---------------------------------------------------------------------------------------------------


def conv_bn(c_in: int, c_out: int) -> nn.Sequential:
    """3x3 conv (no bias) -> batch norm -> ReLU."""
    return nn.Sequential(
        nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU(inplace=True)
    )


class VGG(nn.Module):
    """VGG with batch norm: the conv stages of the config, then one linear layer on the flattened last map
    (1x1 at 32x32; (S/32)x(S/32) for S x S images)."""

    def __init__(self, cfg: list[int | str], num_classes: int = 10, image_size: int = IMAGE_SIZE):
        super().__init__()
        layers: list[nn.Module] = []
        c = 3
        for v in cfg:
            if v == "M":
                layers.append(nn.MaxPool2d(2))
            else:
                layers.append(conv_bn(c, int(v)))
                c = int(v)
        self.features = nn.Sequential(*layers)
        side = image_size // 2 ** cfg.count("M")
        self.classifier = nn.Sequential(nn.Flatten(), nn.Linear(c * side * side, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


@register
def vgg11(num_classes: int = 10, image_size: int = IMAGE_SIZE) -> nn.Module:
    """VGG-11 with batch norm, CIFAR variant (one linear head; 9.2M params at 32x32)."""
    return VGG([64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"], num_classes, image_size)


# --- ResNets -------------------------------------------------------------------------------------------------


class BasicBlock(nn.Module):
    """Two 3x3 conv-BN layers with an identity (or 1x1 projection) shortcut."""

    def __init__(self, c_in: int, c_out: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.shortcut = nn.Identity()
        if stride != 1 or c_in != c_out:
            self.shortcut = nn.Sequential(
                nn.Conv2d(c_in, c_out, 1, stride=stride, bias=False), nn.BatchNorm2d(c_out)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return torch.relu(out + self.shortcut(x))


class ResNet(nn.Module):
    """ResNet for CIFAR: 3x3 stem without max-pool, four stages of basic blocks, global average pool."""

    def __init__(self, blocks: tuple[int, ...], num_classes: int = 10, width: int = 64):
        super().__init__()
        self.stem = conv_bn(3, width)
        stages, c = [], width
        for i, n in enumerate(blocks):
            c_out = width * 2**i
            for j in range(n):
                stages.append(BasicBlock(c, c_out, stride=2 if i > 0 and j == 0 else 1))
                c = c_out
        self.stages = nn.Sequential(*stages)
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(c, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.stages(self.stem(x)))


@register
def resnet18(num_classes: int = 10, image_size: int = IMAGE_SIZE) -> nn.Module:
    """ResNet-18, CIFAR variant: 3x3 stem, no initial max-pool (11.2M params)."""
    return ResNet((2, 2, 2, 2), num_classes)


class Residual(nn.Module):
    """x + f(x)."""

    def __init__(self, *layers: nn.Module):
        super().__init__()
        self.f = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.f(x)


class Scale(nn.Module):
    """Multiply by a constant (keeps the logits of ResNet-9 in a good range)."""

    def __init__(self, factor: float):
        super().__init__()
        self.factor = factor

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.factor


@register
def resnet9(num_classes: int = 10, image_size: int = IMAGE_SIZE) -> nn.Module:
    """ResNet-9, the DAWNBench-style residual net: 64-128-256-512 with two residual blocks (6.6M params)."""

    def down(c_in: int, c_out: int) -> nn.Sequential:
        return nn.Sequential(conv_bn(c_in, c_out), nn.MaxPool2d(2))

    return nn.Sequential(
        conv_bn(3, 64),
        down(64, 128),
        Residual(conv_bn(128, 128), conv_bn(128, 128)),
        down(128, 256),
        down(256, 512),
        Residual(conv_bn(512, 512), conv_bn(512, 512)),
        nn.AdaptiveMaxPool2d(1),
        nn.Flatten(),
        nn.Linear(512, num_classes, bias=False),
        Scale(0.125),
    )


# --- the fast net (hlb-CIFAR10 / airbench lineage) ------------------------------------------------------------


class FrozenScaleBatchNorm(nn.BatchNorm2d):
    """Batch norm with the scale frozen at 1 (only the bias learns) and fast-moving running statistics."""

    def __init__(self, channels: int, momentum: float = 0.4, eps: float = 1e-12):
        super().__init__(channels, eps=eps, momentum=momentum)
        self.weight.requires_grad_(False)


class DiracConv(nn.Conv2d):
    """3x3 'same' conv without bias whose first in_channels filters start as the identity."""

    def __init__(self, c_in: int, c_out: int):
        super().__init__(c_in, c_out, kernel_size=3, padding="same", bias=False)

    def reset_parameters(self) -> None:
        super().reset_parameters()
        nn.init.dirac_(self.weight.data[: self.in_channels])


class ConvGroup(nn.Module):
    """conv -> max-pool 2 -> BN -> GELU -> conv -> BN -> GELU."""

    def __init__(self, c_in: int, c_out: int):
        super().__init__()
        self.conv1 = DiracConv(c_in, c_out)
        self.pool = nn.MaxPool2d(2)
        self.norm1 = FrozenScaleBatchNorm(c_out)
        self.conv2 = DiracConv(c_out, c_out)
        self.norm2 = FrozenScaleBatchNorm(c_out)
        self.act = nn.GELU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.act(self.norm1(self.pool(self.conv1(x))))
        return self.act(self.norm2(self.conv2(x)))


class FastNet(nn.Module):
    """A 2x2 whitening conv (frozen, set from the data), three conv groups, max-pool and a scaled linear head."""

    def __init__(self, num_classes: int = 10, widths: tuple[int, int, int] = (64, 256, 256)):
        super().__init__()
        self.whiten = nn.Conv2d(3, 24, kernel_size=2, padding=0, bias=True)
        self.whiten.weight.requires_grad_(False)
        self.layers = nn.Sequential(
            nn.GELU(),
            ConvGroup(24, widths[0]),
            ConvGroup(widths[0], widths[1]),
            ConvGroup(widths[1], widths[2]),
            nn.AdaptiveMaxPool2d(1),
            nn.Flatten(),
        )
        self.head = nn.Linear(widths[2], num_classes, bias=False)
        with torch.no_grad():
            self.head.weight /= self.head.weight.std()
        self.head_scale = 1 / widths[2]

    @torch.no_grad()
    def init_whitening(self, images: torch.Tensor, eps: float = 5e-4) -> None:
        """Set the whitening filters from the eigenvectors of the 2x2 patch covariance of normalised images."""
        patches = images.float().unfold(2, 2, 1).unfold(3, 2, 1).permute(0, 2, 3, 1, 4, 5).reshape(-1, 12)
        cov = patches.T @ patches / len(patches)
        eigenvalues, eigenvectors = torch.linalg.eigh(cov)
        filters = (eigenvectors.T / torch.sqrt(eigenvalues + eps)[:, None]).reshape(12, 3, 2, 2)
        self.whiten.weight.copy_(torch.cat([filters, -filters]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.layers(self.whiten(x))) * self.head_scale


@register
def airbench(num_classes: int = 10, image_size: int = IMAGE_SIZE) -> nn.Module:
    """The fast net of airbench94: whitening conv, conv groups 64/256/256, GELU, frozen-scale BN (2.0M params)."""
    return FastNet(num_classes, (64, 256, 256))


@register
def airbench_small(num_classes: int = 10, image_size: int = IMAGE_SIZE) -> nn.Module:
    """A narrower fast net, conv groups 32/64/128, for quick CPU runs."""
    return FastNet(num_classes, (32, 64, 128))
