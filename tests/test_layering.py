"""The dependency rule: the core never imports a front-end or a UI library."""

import ast
from pathlib import Path

FORBIDDEN = {"comfy", "comfy_api", "folder_paths", "gradio", "gradio_client", "trainer", "comfyui_vpdsr", "gradio_app", "matplotlib"}
ROOT = Path(__file__).resolve().parents[1]


def _imports(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    return names


def test_core_imports_no_front_end():
    offenders = {str(p.relative_to(ROOT)): sorted(_imports(p) & FORBIDDEN) for p in (ROOT / "vpdsr").rglob("*.py")}
    assert {k: v for k, v in offenders.items() if v} == {}


def test_front_ends_do_not_import_each_other():
    pairs = {"gradio_app": {"comfyui_vpdsr", "trainer"}, "comfyui_vpdsr": {"gradio_app", "trainer"}, "trainer": {"gradio_app", "comfyui_vpdsr", "gradio", "comfy"}}
    for package, forbidden in pairs.items():
        for path in (ROOT / package).rglob("*.py"):
            assert not (_imports(path) & forbidden), f"{path} imports {_imports(path) & forbidden}"
