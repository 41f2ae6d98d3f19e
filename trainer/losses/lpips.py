"""LPIPS (VGG variant) from weights the user supplies; nothing is ever downloaded.

LPIPS compares unit-normalised VGG16 activations at five depths, weighting each channel by a
learned linear layer. Two files are needed: torchvision's VGG16 weights and the LPIPS linear
layers (the ``vgg.pth`` of the ``lpips`` package, version 0.1). Without them LPIPS cannot mean
what it means in the papers, so enabling it without both paths is an error, not a fallback.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from vpdsr.errors import ModelFileError

from .weights_io import read_state_dict

__all__ = ["LPIPS", "load_lpips"]

# VGG16's convolutional part as torchvision lays it out ("M" = max-pool), so that its
# ``features.N`` weights load by index; the classifier (120M parameters) is never built.
_VGG16 = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512)
_TAPS = (3, 8, 15, 22, 29)  # relu1_2, relu2_2, relu3_3, relu4_3, relu5_3
_CHANNELS = (64, 128, 256, 512, 512)
# The input normalisation LPIPS v0.1 was trained with, for images in [-1, 1].
_SHIFT = (-0.030, -0.088, -0.188)
_SCALE = (0.458, 0.448, 0.450)


def _vgg16_features() -> nn.Sequential:
    layers: list[nn.Module] = []
    channels = 3
    for item in _VGG16:
        if item == "M":
            layers.append(nn.MaxPool2d(2, 2))
        else:
            layers += [nn.Conv2d(channels, item, 3, padding=1), nn.ReLU()]
            channels = item
    return nn.Sequential(*layers)


class LPIPS(nn.Module):
    """Perceptual distance (B,) between images in [-1, 1]; frozen, gradients flow to the inputs."""

    def __init__(self) -> None:
        super().__init__()
        self.features = _vgg16_features()
        self.lins = nn.ModuleList(nn.Conv2d(c, 1, 1, bias=False) for c in _CHANNELS)
        self.register_buffer("shift", torch.tensor(_SHIFT).view(1, 3, 1, 1))
        self.register_buffer("scale", torch.tensor(_SCALE).view(1, 3, 1, 1))
        self.requires_grad_(False).eval()

    def train(self, mode: bool = True) -> LPIPS:
        return super().train(False)

    def _taps(self, x: torch.Tensor) -> list[torch.Tensor]:
        out = []
        x = (x - self.shift) / self.scale
        for i, layer in enumerate(self.features):
            x = layer(x)
            if i in _TAPS:
                out.append(x / (x.pow(2).sum(dim=1, keepdim=True).sqrt() + 1e-10))
        return out

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        dist = 0.0
        for lin, fa, fb in zip(self.lins, self._taps(a), self._taps(b), strict=True):
            dist = dist + lin((fa - fb).pow(2)).mean(dim=(1, 2, 3))
        return dist


def load_lpips(vgg_path: str | Path | None, lin_path: str | Path | None) -> LPIPS:
    if not vgg_path or not lin_path:
        raise ModelFileError(
            "LPIPS is enabled (losses.reconstruction.lpips_weight > 0) but its weights are not given: set "
            "losses.reconstruction.lpips_vgg_path (torchvision VGG16 weights) and lpips_lin_path (the lpips "
            "package's v0.1 vgg.pth), or set lpips_weight to 0"
        )
    model = LPIPS()
    vgg = {
        k.removeprefix("features."): v
        for k, v in read_state_dict(vgg_path, "VGG16").items()
        if k.startswith("features.")
    }
    lins = read_state_dict(lin_path, "LPIPS linear-layer")
    lins = {k.replace(".model.1.", ".").replace("lin", "", 1): v for k, v in lins.items() if k.startswith("lin")}
    for target, state, what, path in (
        (model.features, vgg, "VGG16", vgg_path),
        (model.lins, lins, "LPIPS linear-layer", lin_path),
    ):
        try:
            target.load_state_dict(state, strict=True)
        except RuntimeError as err:
            raise ModelFileError(
                f"{path} does not fit the {what} layers LPIPS needs: {str(err).splitlines()[0]} ..."
            ) from None
    return model
