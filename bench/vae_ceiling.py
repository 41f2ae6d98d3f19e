"""The VAE ceiling: what a model's VAE alone makes of the HR images (encode, then decode).

    python -m bench.vae_ceiling --hr DIR/test_HR --model default [--model mine=student.safetensors]
        [--teacher-file runs/tiny-teacher/tiny-teacher.safetensors] [--limit 20]

A one-step student's output passes through its VAE decoder, so no student can be sharper or
less blocky than the decoder of a perfect latent. If the HR images themselves come back blocky
here, the grid in the SR comes from the VAE, and training the UNet longer will not remove it.
Prints the HR's own grid scores beside the reconstructions, the same columns as bench.quality.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from torch import nn

from bench.metric_suite import BUILTIN_COLUMNS
from bench.quality import HR_ROW, Record, markdown_table, mean_record
from bench.quality_io import BenchError, list_images, load_rgb, to_tensor
from bench.sr_methods import split_named

_COLUMNS = [c for c in BUILTIN_COLUMNS if c.name in ("PSNR-Y", "HaarPSI", "grid4", "grid8")]


def _student_vae(spec: str) -> tuple[str, nn.Module]:
    import vpdsr

    name, value = split_named(spec, "vpdsr-default" if spec == "default" else None)
    try:
        # fp32: the ceiling is the VAE's own, not the precision's (auto is bf16 on CPUs that have it)
        pipe = vpdsr.load_pipeline(model=None if value == "default" else value, device="cpu", dtype="fp32")
    except vpdsr.VPDError as err:
        raise BenchError(f"cannot load model {value}: {err}") from None
    return name, pipe.student.vae


def _teacher_vae(path: str) -> tuple[str, nn.Module]:
    from trainer.teacher_file import load_teacher

    try:
        teacher, _ = load_teacher(path)
    except Exception as err:  # a damaged or foreign file: name it, no traceback
        raise BenchError(f"cannot load teacher file {path}: {err}") from None
    return f"{Path(path).stem} (teacher)", teacher.vae


@torch.no_grad()
def reconstruct(vae: nn.Module, image: torch.Tensor) -> torch.Tensor:
    """Encode to the posterior mean and decode, in [0, 1]; the image is padded to the VAE's
    multiple and cropped back."""
    factor = 2 ** (len(vae.config.block_out_channels) - 1)
    h, w = image.shape[-2:]
    x = nn.functional.pad(image * 2 - 1, (0, -w % factor, 0, -h % factor), mode="replicate")
    out = vae.decode(vae.encode(x).latent_dist.mean).sample
    return ((out[..., :h, :w] + 1) / 2).clamp(0, 1)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.vae_ceiling", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    parser.add_argument("--hr", type=Path, required=True, help="folder of HR images")
    parser.add_argument("--model", action="append", default=[], metavar="[NAME=]PATH",
                        help="a student file, or 'default' (repeatable)")  # fmt: skip
    parser.add_argument("--teacher-file", action="append", default=[], help="a trainer teacher file (repeatable)")
    parser.add_argument("--limit", type=int, help="only the first N images (sorted by name)")
    args = parser.parse_args(argv)
    try:
        vaes = [_student_vae(s) for s in args.model or ["default"]] + [_teacher_vae(p) for p in args.teacher_file]
        paths = list_images(args.hr)[: args.limit]
        if not paths:
            raise BenchError(f"no images in {args.hr}")
    except BenchError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    records: dict[str, list[Record]] = {HR_ROW: [], **{name: [] for name, _ in vaes}}
    for path in paths:
        hr = to_tensor(load_rgb(path))
        outputs = {HR_ROW: hr, **{name: reconstruct(vae.eval(), hr) for name, vae in vaes}}
        for name, image in outputs.items():
            shown = [c for c in _COLUMNS if name != HR_ROW or not c.needs_reference]
            records[name].append({c.name: float(c.compute(image, hr)[0]) for c in shown})
    print(f"VAE encode -> decode of {len(paths)} HR images from {args.hr} (no colour fix)\n")
    print(markdown_table([mean_record(name, own, _COLUMNS) for name, own in records.items()], _COLUMNS))
    return 0


if __name__ == "__main__":
    sys.exit(main())
