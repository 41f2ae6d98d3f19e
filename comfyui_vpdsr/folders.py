"""Where the nodes find model files: ComfyUI's model folders, plus ``models/vpdsr`` for students.

A dropdown entry that can come from several ComfyUI folders carries its folder as a prefix
("checkpoints/sd_turbo.safetensors"), so one list spans them and every entry still resolves to
exactly one file. Only names ComfyUI itself lists are resolved, so a name cannot reach outside
the model folders.
"""

from __future__ import annotations

import os
from pathlib import Path

import folder_paths

from vpdsr import default_model_path
from vpdsr.errors import ModelFileError
from vpdsr.semantics.loading import SUFFIXES as CLIP_SUFFIXES

STUDENT_FOLDER = "vpdsr"
EMBEDDED_DEFAULT = "embedded default"
NO_BASE = "none"
_BASE_CHECKPOINTS = "checkpoints"
_BASE_DIFFUSERS = "diffusers"
# ComfyUI maps "clip" to models/text_encoders (and the older models/clip); the prefix stays "clip/"
# so that saved workflows keep naming the same files. Checkpoints are there for SD 2.x / SDXL
# single files, whose text tower is a CLIP's.
_CLIP_FOLDERS = ("clip", "clip_vision", "checkpoints")
NO_TEXT_ENCODER = "none"


def register_student_folder() -> None:
    """Add ``models/vpdsr`` to ComfyUI's folders, keeping paths a user added in extra_model_paths.yaml."""
    folder_paths.add_model_folder_path(STUDENT_FOLDER, os.path.join(folder_paths.models_dir, STUDENT_FOLDER))
    paths, _ = folder_paths.folder_names_and_paths[STUDENT_FOLDER]
    folder_paths.folder_names_and_paths[STUDENT_FOLDER] = (paths, {".safetensors"})


def _searched(folder: str) -> str:
    return ", ".join(folder_paths.get_folder_paths(folder)) or "(no folder configured)"


def student_options() -> list[str]:
    return [EMBEDDED_DEFAULT, *folder_paths.get_filename_list(STUDENT_FOLDER)]


def student_path(name: str) -> Path:
    if name == EMBEDDED_DEFAULT:
        path = default_model_path()
        if path is None:
            raise ModelFileError(
                "This version of vpdsr ships no embedded default model yet. Put a VPD-SR student "
                f"(.safetensors) in models/{STUDENT_FOLDER} (searched: {_searched(STUDENT_FOLDER)}), "
                "refresh the page (R), and pick it in 'model'."
            )
        return path
    full = folder_paths.get_full_path(STUDENT_FOLDER, name)
    if full is None:
        raise ModelFileError(
            f"VPD-SR model {name!r} was not found in models/{STUDENT_FOLDER} (searched: {_searched(STUDENT_FOLDER)})."
        )
    return Path(full)


def _diffusers_folders() -> list[str]:
    found = []
    for root in folder_paths.get_folder_paths(_BASE_DIFFUSERS):
        for here, _, files in os.walk(root, followlinks=True):
            if "model_index.json" in files:
                found.append(Path(os.path.relpath(here, root)).as_posix())
    return sorted(set(found))


def base_options() -> list[str]:
    """Single-file SD 2.x / SD-Turbo checkpoints and diffusers folders, for LoRA students."""
    files = [n for n in folder_paths.get_filename_list(_BASE_CHECKPOINTS) if n.lower().endswith(".safetensors")]
    return [
        NO_BASE,
        *(f"{_BASE_CHECKPOINTS}/{n}" for n in files),
        *(f"{_BASE_DIFFUSERS}/{n}" for n in _diffusers_folders()),
    ]


def base_path(name: str) -> Path | None:
    if name == NO_BASE:
        return None
    folder, _, rest = name.partition("/")
    if folder == _BASE_CHECKPOINTS:
        full = folder_paths.get_full_path(_BASE_CHECKPOINTS, rest)
        if full is not None:
            return Path(full)
    elif folder == _BASE_DIFFUSERS and rest in _diffusers_folders():
        for root in folder_paths.get_folder_paths(_BASE_DIFFUSERS):
            if (Path(root) / rest / "model_index.json").is_file():
                return Path(root) / rest
    raise ModelFileError(
        f"base model {name!r} was not found: put single-file .safetensors checkpoints in models/{_BASE_CHECKPOINTS} "
        f"(searched: {_searched(_BASE_CHECKPOINTS)}) or diffusers folders in models/{_BASE_DIFFUSERS} "
        f"(searched: {_searched(_BASE_DIFFUSERS)})."
    )


def clip_options() -> list[str]:
    return [
        f"{folder}/{n}"
        for folder in _CLIP_FOLDERS
        for n in folder_paths.get_filename_list(folder)
        if n.lower().endswith(CLIP_SUFFIXES)
    ]


def text_encoder_options() -> list[str]:
    return [NO_TEXT_ENCODER, *clip_options()]


def text_encoder_path(name: str) -> Path | None:
    return None if name == NO_TEXT_ENCODER else clip_path(name)


def clip_path(name: str) -> Path:
    folder, _, rest = name.partition("/")
    full = folder_paths.get_full_path(folder, rest) if folder in _CLIP_FOLDERS else None
    if full is None:
        searched = "; ".join(f"models/{f}: {_searched(f)}" for f in _CLIP_FOLDERS)
        raise ModelFileError(f"CLIP checkpoint {name!r} was not found ({searched}).")
    return Path(full)
