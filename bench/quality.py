"""Quality benchmark: vpdsr models against classical filters and other methods' results.

    python -m bench.quality --lr DIR/test_LR --hr DIR/test_HR \\
        --model default --model mine=student.safetensors \\
        --results osediff=DIR/results_osediff --out bench_out/drealsr

Without ``--method``, bicubic and Lanczos (PIL) are included as baselines. Writes ``table.md``
(means), ``per_image.csv`` (every image and method, then one mean row per method) and
``sheet.png`` (crops of a few images side by side) to ``--out``, and prints the table.

PSNR-Y and SSIM-Y follow pyiqa's conventions (``test_y_channel=True, color_space='ycbcr'``),
so the numbers are comparable with the OSEDiff/VPD-SR papers' tables.
"""

from __future__ import annotations

import argparse
import csv
import math
import sys
from pathlib import Path

from PIL import Image
from tqdm import tqdm

from bench.comparison_sheet import SheetRow, detail_box, render_sheet
from bench.metric_suite import Column, build_columns
from bench.quality_io import BenchError, ImagePair, find_pairs, load_rgb, to_tensor
from bench.sr_methods import CLASSICAL, Method, build_methods

Record = dict[str, str | float]  # "image", "method", then one entry per column name


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench.quality",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--lr", type=Path, required=True, help="folder of LR images")
    parser.add_argument("--hr", type=Path, required=True, help="folder of HR images, same file names")
    parser.add_argument(
        "--model",
        action="append",
        default=[],
        metavar="[NAME=]PATH",
        help="a vpdsr student file, or 'default' for the embedded model (repeatable)",
    )
    parser.add_argument("--base", help="base weights for LoRA students (diffusers folder or .safetensors checkpoint)")
    parser.add_argument(
        "--method",
        action="append",
        choices=sorted(CLASSICAL),
        default=None,
        help="classical PIL filter (repeatable; default: bicubic and lanczos)",
    )
    parser.add_argument(
        "--results",
        action="append",
        default=[],
        metavar="[NAME=]DIR",
        help="folder of precomputed SR images named like the HR files (repeatable)",
    )
    parser.add_argument(
        "--pyiqa-metric",
        action="append",
        default=[],
        metavar="NAME",
        help="extra pyiqa metric, e.g. lpips, dists, clipiqa, musiq, niqe; needs pyiqa and its "
        "pretrained weights (repeatable)",
    )
    parser.add_argument("--out", type=Path, help="folder for table.md, per_image.csv and sheet.png")
    parser.add_argument("--device", default="auto", help="device for models and pyiqa metrics")
    parser.add_argument("--limit", type=int, help="only the first N images (sorted by name)")
    parser.add_argument("--sheet-images", type=int, default=4, help="rows of the comparison sheet")
    parser.add_argument("--crop", type=int, default=128, help="crop side in HR pixels for the sheet")
    args = parser.parse_args(argv)
    if args.method is None:
        args.method = list(CLASSICAL)
    if args.limit is not None and args.limit < 1:
        parser.error("--limit must be at least 1")
    if args.sheet_images < 0 or args.crop < 8:
        parser.error("--sheet-images must be >= 0 and --crop >= 8")
    return args


def sheet_picks(pairs: list[ImagePair], count: int) -> set[str]:
    """``count`` images spread evenly over the (sorted) list, so the sheet is reproducible."""
    if count == 0 or not pairs:
        return set()
    if count >= len(pairs):
        return {p.name for p in pairs}
    step = (len(pairs) - 1) / max(1, count - 1)
    return {pairs[round(i * step)].name for i in range(count)}


def _caption(record: Record | None, columns: list[Column]) -> str:
    if record is None:
        return ""
    shown = [c for c in columns if c.name in ("PSNR-Y", "LSD-HF")]
    return "  ".join(f"{c.name} {record[c.name]:.{c.digits}f}" for c in shown)


def evaluate(
    pairs: list[ImagePair], methods: list[Method], columns: list[Column], sheet_names: set[str], crop: int
) -> tuple[list[Record], list[SheetRow]]:
    """Every method on every pair; the records of all, and sheet rows for ``sheet_names``."""
    records: list[Record] = []
    rows: list[SheetRow] = []
    for pair in tqdm(pairs, desc="images", unit="img"):
        lr, hr = load_rgb(pair.lr), load_rgb(pair.hr)
        hr_tensor = to_tensor(hr)
        outputs: dict[str, Image.Image] = {}
        by_method: dict[str, Record] = {}
        for method in methods:
            sr = method.upscale(lr, hr.size, pair)
            if sr.size != hr.size:
                raise BenchError(
                    f"{method.name} gave {sr.width}x{sr.height} for {pair.name}, "
                    f"but the HR image is {hr.width}x{hr.height}"
                )
            sr_tensor = to_tensor(sr)
            record: Record = {"image": pair.name, "method": method.name}
            record.update({c.name: float(c.compute(sr_tensor, hr_tensor)[0]) for c in columns})
            records.append(record)
            by_method[method.name] = record
            outputs[method.name] = sr
        if pair.name in sheet_names:
            box = detail_box(hr, crop)
            others = [m.name for m in methods if m.name != "bicubic"]
            if "bicubic" in outputs:
                bicubic = outputs["bicubic"]
            else:
                bicubic = lr.resize(hr.size, Image.Resampling.BICUBIC)
            rows.append(
                SheetRow(
                    title=pair.name,
                    crops=[bicubic.crop(box), *(outputs[n].crop(box) for n in others), hr.crop(box)],
                    captions=[
                        _caption(by_method.get("bicubic"), columns),
                        *(_caption(by_method[n], columns) for n in others),
                        "ground truth",
                    ],
                )
            )
    return records, rows


def mean_records(records: list[Record], methods: list[Method], columns: list[Column]) -> list[Record]:
    """One record per method with the mean of every column over the images."""
    means = []
    for method in methods:
        own = [r for r in records if r["method"] == method.name]
        mean: Record = {"image": "mean", "method": method.name}
        mean.update({c.name: math.fsum(float(r[c.name]) for r in own) / len(own) for c in columns})
        means.append(mean)
    return means


def markdown_table(means: list[Record], columns: list[Column]) -> str:
    header = "| Method | " + " | ".join(c.header for c in columns) + " |"
    rule = "|---|" + "---:|" * len(columns)
    lines = [header, rule]
    for mean in means:
        cells = " | ".join(f"{float(mean[c.name]):.{c.digits}f}" for c in columns)
        lines.append(f"| {mean['method']} | {cells} |")
    return "\n".join(lines)


def write_csv(path: Path, records: list[Record], means: list[Record], columns: list[Column]) -> None:
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=["image", "method", *(c.name for c in columns)])
        writer.writeheader()
        for record in [*records, *means]:
            writer.writerow({k: f"{v:.6f}" if isinstance(v, float) else v for k, v in record.items()})


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        pairs = find_pairs(args.lr, args.hr, args.limit)
        methods = build_methods(args.model, args.method, args.results, args.base, args.device)
        columns = build_columns(args.pyiqa_metric, args.device)
        records, rows = evaluate(pairs, methods, columns, sheet_picks(pairs, args.sheet_images), args.crop)
    except BenchError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    means = mean_records(records, methods, columns)
    caption = (
        f"{len(pairs)} images from {args.hr}. Fidelity: PSNR-Y, SSIM-Y (pyiqa conventions), "
        "HaarPSI (piq). Detail: LSD-HF, high-band log-spectral distance to HR (lower is better)."
    )
    table = markdown_table(means, columns)
    print(f"\n{caption}\n\n{table}")
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "table.md").write_text(f"{caption}\n\n{table}\n")
        write_csv(args.out / "per_image.csv", records, means, columns)
        written = ["table.md", "per_image.csv"]
        if rows:
            columns_shown = ["LR (bicubic)", *(m.name for m in methods if m.name != "bicubic"), "HR"]
            render_sheet(columns_shown, rows).save(args.out / "sheet.png")
            written.append("sheet.png")
        print(f"\nwrote {', '.join(written)} to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
