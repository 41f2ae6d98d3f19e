"""ComfyUI nodes for vpdsr: Load VPD Model, One-Step SR, Load CLIP and the CLIP Semantic Inspector.

ComfyUI loads them through the repository's top-level ``__init__.py`` (which also names ``web/``
as the folder of help pages); ``extension.py`` holds the entry point. Importing this package
alone needs no ComfyUI, so tools that walk the repository (pytest, packaging) can import it.
"""
