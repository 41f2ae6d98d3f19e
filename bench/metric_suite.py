"""The quality table's metrics: fidelity (PSNR-Y, SSIM-Y, HaarPSI), detail (LSD-HF), artefacts (grid).

A generative upscaler trades fidelity for detail, so the table shows both kinds side by side, and
since detail can be faked (a blocky image has plenty of high-band power), also ``grid4``/``grid8``:
how much of the high band is a pattern repeating every 4 or 8 pixels. Those need no reference,
so they can be read off the HR images too. PSNR/SSIM/LSD-HF/grid come from ``vpdsr.metrics`` (the
trainer validates with the same code); HaarPSI from piq, which needs no downloaded weights.
Metrics that need pretrained networks (LPIPS, DISTS, CLIPIQA, MUSIQ, NIQE, ...) can be added
through pyiqa when it and its weights are present; they are never approximated.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import piq
import torch

from bench.quality_io import BenchError
from vpdsr.metrics import grid_p, lsd_hf, psnr_y, ssim_y

PairMetric = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (sr, hr) BCHW -> (B,)


@dataclass(frozen=True)
class Column:
    name: str
    higher_is_better: bool
    compute: PairMetric
    digits: int = 4  # decimals in the table
    needs_reference: bool = True  # False: ``compute`` ignores hr, so the HR images can be scored too

    @property
    def header(self) -> str:
        return f"{self.name} {'↑' if self.higher_is_better else '↓'}"


def haarpsi(sr: torch.Tensor, hr: torch.Tensor) -> torch.Tensor:
    """piq's HaarPSI on RGB in [0, 1] with its default (published) constants."""
    return piq.haarpsi(sr, hr, data_range=1.0, reduction="none")


def grid_column(period: int) -> Column:
    """``grid<period>`` of the SR image alone (see ``vpdsr.metrics.grid_p``)."""

    def compute(sr: torch.Tensor, hr: torch.Tensor) -> torch.Tensor:
        return grid_p(sr, period)

    return Column(f"grid{period}", False, compute, digits=3, needs_reference=False)


BUILTIN_COLUMNS = (
    Column("PSNR-Y", True, psnr_y, digits=2),
    Column("SSIM-Y", True, ssim_y),
    Column("HaarPSI", True, haarpsi),
    Column("LSD-HF", False, lsd_hf, digits=3),
    grid_column(4),  # one latent pixel of the tiny x4 VAE, and one LR pixel at x4
    grid_column(8),  # one latent pixel of SD's x8 VAE; a 4 px pattern shows here too
)


def pyiqa_column(metric_name: str, device: str) -> Column:
    """A pyiqa metric as a column; a clear error if pyiqa or the metric's weights are missing."""
    try:
        import pyiqa
    except ImportError:
        raise BenchError(
            f"--pyiqa-metric {metric_name} needs pyiqa, which is not installed (pip install pyiqa)"
        ) from None
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    print(f"pyiqa: loading {metric_name!r} (pyiqa fetches its weights into its cache on first use)")
    try:
        metric = pyiqa.create_metric(metric_name, device=device)
    except Exception as err:  # pyiqa raises anything from KeyError to URLError here
        raise BenchError(
            f"pyiqa metric {metric_name!r} is unavailable: {type(err).__name__}: {err}. "
            "Check the name (pyiqa.list_models()); offline, its pretrained weights must already be in "
            "torch's hub cache (~/.cache/torch/hub/pyiqa, and checkpoints/ for backbones)."
        ) from None
    full_reference = metric.metric_mode == "FR"

    def compute(sr: torch.Tensor, hr: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            score = metric(sr.to(device), hr.to(device)) if full_reference else metric(sr.to(device))
        return score.detach().double().cpu().reshape(sr.shape[0])

    return Column(metric_name.upper(), not metric.lower_better, compute, needs_reference=full_reference)


def build_columns(pyiqa_metrics: list[str], device: str) -> list[Column]:
    return [*BUILTIN_COLUMNS, *(pyiqa_column(name, device) for name in pyiqa_metrics)]
