"""Where each input's result goes, decided for the whole run before any model loads.

A batch run must never lose an image, so every output path is fixed up front and checked
together: two inputs never share an output, no output replaces an input or lands where a later
folder scan would read it back, and an output that already exists is kept unless the caller asks
for it to be replaced. Keeping existing outputs is also what lets an interrupted run resume.

Naming: a folder input keeps its relative structure under the output folder, and every result is
a PNG named after its input's stem (``a/photo.jpg`` -> ``OUT/a/photo.png``). Where several inputs
would get one name (``plain.tiff`` and ``plain.webp``), a ``.png`` input keeps the plain name and
each other one is named after its whole file name (``plain.tiff.png``, ``plain.webp.png``), so a
result's name never depends on which other files happen to be in the run. Anything that still
collides is refused before any work.

Only the standard library and Pillow are imported: this runs before torch is loaded.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path

from PIL import Image, ImageFile

from .errors import VPDError

__all__ = ["Job", "Plan", "plan_outputs", "readable_suffixes", "writable_suffixes"]

NOT_AN_IMAGE = "not an image format Pillow reads"
NOT_A_FILE = "not a regular file"
LINKED_FOLDER = "a link to a folder (folder scans do not follow links)"
# Pillow registers these but cannot decode them: stubs need an external handler, and its MPEG
# plugin reads only the size, so a video clip would "decode" as a black frame.
_UNDECODABLE = {"MPEG"}


@cache
def readable_suffixes() -> frozenset[str]:
    """Lower-case suffixes (``.gif``) of every format this Pillow can decode."""
    Image.init()
    return frozenset(
        suffix
        for suffix, fmt in Image.registered_extensions().items()
        if fmt in Image.OPEN and fmt not in _UNDECODABLE and not _is_stub(fmt)
    )


def _is_stub(fmt: str) -> bool:
    factory = Image.OPEN[fmt][0]
    return isinstance(factory, type) and issubclass(factory, ImageFile.StubImageFile)


@cache
def writable_suffixes() -> frozenset[str]:
    """Lower-case suffixes Pillow can write: what makes an output name a file, not a folder."""
    Image.init()
    return frozenset(suffix for suffix, fmt in Image.registered_extensions().items() if fmt in Image.SAVE)


@dataclass(frozen=True)
class Job:
    """One input and the path its result is written to."""

    source: Path
    target: Path


@dataclass
class Plan:
    """The whole run: what to upscale, what is kept, and which files were passed over and why."""

    output: Path  # the output folder, or the output file of a single input
    jobs: list[Job] = field(default_factory=list)
    existing: list[Job] = field(default_factory=list)  # outputs already there, kept
    skipped: list[tuple[Path, str]] = field(default_factory=list)  # files in folders that are not inputs

    @property
    def inputs(self) -> int:
        return len(self.jobs) + len(self.existing)


@dataclass(frozen=True)
class _Source:
    path: Path
    relative: Path  # its place under the output folder
    folder: Path | None  # the resolved input folder it was found in, None for a file given by name


def plan_outputs(inputs: Sequence[str | Path], output: str | Path, overwrite: bool = False) -> Plan:
    """Find the input images and give each its output path; raises ``VPDError`` for a run that
    cannot be done as asked (a missing input, colliding names, an output that cannot be written).

    ``inputs`` are files (taken whatever their suffix: the decoder decides) and folders (searched
    recursively for the formats Pillow reads). ``output`` is a folder, or the output file when it
    has an image suffix and there is one input.
    """
    out = Path(output)
    named_folder = str(output).endswith(("/", os.sep)) or out.is_dir()  # "shots.png/" is a folder
    as_file = out.suffix.lower() in writable_suffixes() and not named_folder
    out_real = Path(os.path.realpath(out))
    plan = Plan(output=out)
    sources = _find_sources([Path(p) for p in inputs], None if as_file else out_real, plan.skipped)
    if not sources:
        return plan
    if as_file:
        if len(sources) > 1:
            raise VPDError(
                f"the output {out} names one image file, but there are {len(sources)} input images; give a folder"
            )
        targets = {sources[0]: out}
    else:
        targets = _name_targets(sources, out)
    _check_no_input_replaced(targets)
    _check_no_output_read_back(targets, out_real)
    _check_writable(out.parent if as_file else out)
    for source, target in targets.items():
        job = Job(source.path, target)
        if os.path.lexists(target) and not (overwrite and target.is_file()):
            plan.existing.append(job)
        else:
            plan.jobs.append(job)
    return plan


def _find_sources(paths: list[Path], out_folder: Path | None, skipped: list[tuple[Path, str]]) -> list[_Source]:
    """Explicit files as given and folders scanned in sorted order; a missing or special input
    named on the command line is an error, a special file met in a folder is only skipped."""
    missing = [str(p) for p in paths if not p.exists()]
    if missing:
        raise VPDError(f"input not found: {', '.join(missing)}")
    sources: list[_Source] = []
    for path in paths:
        if path.is_dir():
            folder = Path(os.path.realpath(path))
            if folder == out_folder:
                raise VPDError(
                    f"{path} is both the input and the output folder, so a later run would read the results "
                    f"back as inputs; choose another output folder (a subfolder such as {path / 'upscaled'} works)"
                )
            sources += _scan(path, folder, out_folder, skipped)
        elif path.is_file():
            sources.append(_Source(path, Path(path.name), None))
        else:
            raise VPDError(f"{path}: {NOT_A_FILE} (vpdsr reads image files and folders)")
    return sources


def _scan(top: Path, folder: Path, out_folder: Path | None, skipped: list[tuple[Path, str]]) -> list[_Source]:
    """Every decodable image under ``top``, except inside the output folder (our own results)."""
    found = []
    suffixes = readable_suffixes()

    def unreadable(err: OSError) -> None:
        skipped.append((Path(err.filename), f"cannot be read ({err.strerror or err})"))

    for dirpath, dirnames, filenames in os.walk(top, onerror=unreadable):
        base = Path(dirpath)
        kept = []
        for name in sorted(dirnames):
            if (base / name).is_symlink():
                skipped.append((base / name, LINKED_FOLDER))
            elif Path(os.path.realpath(base / name)) != out_folder:
                kept.append(name)
        dirnames[:] = kept
        for name in sorted(filenames):
            path = base / name
            try:
                regular = stat.S_ISREG(path.stat().st_mode)
            except OSError as err:
                skipped.append((path, f"cannot be read ({err.strerror or err})"))
                continue
            if not regular:
                skipped.append((path, NOT_A_FILE))
            elif path.suffix.lower() not in suffixes:
                skipped.append((path, NOT_AN_IMAGE))
            else:
                found.append(_Source(path, path.relative_to(top), folder))
    return found


def _name_targets(sources: list[_Source], out: Path) -> dict[_Source, Path]:
    names = {s: s.relative.with_name(s.relative.stem + ".png") for s in sources}
    for group in _collisions(names):
        for source in group:
            if source.path.suffix.lower() != ".png":
                names[source] = source.relative.with_name(source.relative.name + ".png")
    clashes = _collisions(names)
    if clashes:
        listed = "; ".join(
            " and ".join(str(s.path) for s in group) + f" -> {out / names[group[0]]}" for group in clashes
        )
        raise VPDError(f"inputs would overwrite each other's output: {listed}; upscale them to separate folders")
    return {s: out / name for s, name in names.items()}


def _collisions(names: dict[_Source, Path]) -> list[list[_Source]]:
    """Groups of sources sharing an output name; compared case-folded, because on macOS and
    Windows ``A.png`` and ``a.png`` are one file."""
    groups: dict[str, list[_Source]] = {}
    for source, name in names.items():
        groups.setdefault(name.as_posix().casefold(), []).append(source)
    return [group for group in groups.values() if len(group) > 1]


def _check_no_input_replaced(targets: dict[_Source, Path]) -> None:
    sources = {Path(os.path.realpath(s.path)): s.path for s in targets}
    for target in targets.values():
        hit = sources.get(Path(os.path.realpath(target)))
        if hit is not None:
            raise VPDError(f"the result for an input would replace the input {hit}; choose another output folder")


def _check_no_output_read_back(targets: dict[_Source, Path], out_real: Path) -> None:
    """An output inside an input folder would be read back as an input on the next run, unless it
    is inside the output folder, which scans leave out."""
    folders = {s.folder for s in targets if s.folder is not None and not _inside(out_real, s.folder)}
    for target in targets.values():
        real = Path(os.path.realpath(target))
        for folder in folders:
            if _inside(real, folder):
                raise VPDError(
                    f"{target} would be written inside the input folder {folder}, where the next run would read it "
                    "as an input; choose another output folder"
                )


def _inside(path: Path, folder: Path) -> bool:
    return path != folder and path.is_relative_to(folder)


def _check_writable(folder: Path) -> None:
    """Fail now, not after the model has loaded, when the output folder cannot be made or written."""
    existing = next(p for p in _self_and_parents(folder.absolute()) if p.exists())
    if not existing.is_dir():
        raise VPDError(f"cannot write to {folder}: {existing} is a file, not a folder")
    if not os.access(existing, os.W_OK | os.X_OK):
        read_only = hasattr(os, "statvfs") and os.statvfs(existing).f_flag & os.ST_RDONLY
        why = "it is on a read-only file system" if read_only else "no permission to write in it"
        raise VPDError(f"cannot write to {folder}: {existing} is not writable ({why})")


def _self_and_parents(path: Path) -> Iterable[Path]:
    yield path
    yield from path.parents
