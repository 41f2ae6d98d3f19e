"""The upscalers a quality benchmark compares: vpdsr models, PIL filters, precomputed folders.

Each method turns one LR image into an SR image of the HR size. Methods are built before the
loop over images, so a missing model file or results folder fails at once, not after an hour.
"""

from __future__ import annotations

from pathlib import Path
from typing import Protocol

from PIL import Image

from bench.quality_io import BenchError, ImagePair, list_images, load_rgb, to_image, to_tensor

CLASSICAL = {"bicubic": Image.Resampling.BICUBIC, "lanczos": Image.Resampling.LANCZOS}


class Method(Protocol):
    name: str

    def upscale(self, lr: Image.Image, hr_size: tuple[int, int], pair: ImagePair) -> Image.Image:
        """The SR image for ``pair`` (its LR already loaded), of exactly ``hr_size`` (W, H)."""
        ...


def split_named(spec: str, default_name: str | None = None) -> tuple[str, str]:
    """``"name=value"`` -> (name, value); a bare ``value`` takes ``default_name`` or its stem."""
    name, sep, value = spec.partition("=")
    if sep and name and value:
        return name, value
    return (default_name or Path(spec.rstrip("/")).stem), spec


class PilResize:
    """A classical interpolation filter, through PIL as the published baselines were made."""

    def __init__(self, name: str) -> None:
        if name not in CLASSICAL:
            raise BenchError(f"unknown classical method {name!r}; choose from {', '.join(CLASSICAL)}")
        self.name = name
        self._resample = CLASSICAL[name]

    def upscale(self, lr: Image.Image, hr_size: tuple[int, int], pair: ImagePair) -> Image.Image:
        return lr.resize(hr_size, self._resample)


class ResultsFolder:
    """SR images computed elsewhere (another method's own script), matched by file stem."""

    def __init__(self, name: str, folder: Path) -> None:
        self.name = name
        self._by_stem = {p.stem: p for p in list_images(folder)}
        if not self._by_stem:
            raise BenchError(f"results folder {folder} for {name!r} holds no images")
        self._folder = folder

    def upscale(self, lr: Image.Image, hr_size: tuple[int, int], pair: ImagePair) -> Image.Image:
        path = self._by_stem.get(Path(pair.name).stem)
        if path is None:
            raise BenchError(f"results folder {self._folder} ({self.name}) has no image for {pair.name}")
        return load_rgb(path)


class VpdsrModel:
    """A vpdsr student file (or the embedded default), run at the pair's own scale factor."""

    def __init__(self, name: str, model: str | None, base: str | None, device: str) -> None:
        import vpdsr  # the core is heavy (diffusers); only pay for it when a model is benchmarked

        self.name = name
        try:
            self._pipe = vpdsr.load_pipeline(model=model, base=base, device=device)
        except vpdsr.VPDError as err:
            raise BenchError(f"cannot load model {model or 'default'} for {name!r}: {err}") from None

    def upscale(self, lr: Image.Image, hr_size: tuple[int, int], pair: ImagePair) -> Image.Image:
        scale = hr_size[0] / lr.width
        if round(lr.height * scale) != hr_size[1]:
            raise BenchError(
                f"{pair.name}: LR {lr.width}x{lr.height} and HR {hr_size[0]}x{hr_size[1]} do not share one scale factor"
            )
        return to_image(self._pipe(to_tensor(lr), scale=scale))


def build_methods(
    models: list[str], classical: list[str], results: list[str], base: str | None, device: str
) -> list[Method]:
    """Methods in table order: our models first, then classical filters, then other results."""
    methods: list[Method] = []
    for spec in models:
        default_name = "vpdsr-default" if spec == "default" else None
        name, value = split_named(spec, default_name)
        methods.append(VpdsrModel(name, None if value == "default" else value, base, device))
    methods.extend(PilResize(name) for name in classical)
    for spec in results:
        name, value = split_named(spec)
        methods.append(ResultsFolder(name, Path(value)))
    names = [m.name for m in methods]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise BenchError(f"two methods are named {', '.join(duplicates)}; name them with NAME=PATH")
    return methods
