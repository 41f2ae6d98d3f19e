"""The vpdsr browser demo (Gradio): ``vpdsr demo``, ``python -m gradio_app`` or ``python gradio_app/app.py``.

Importing the package imports nothing heavy, so ``vpdsr --help`` can list the ``demo`` command
without loading gradio; ``gradio_app.app`` holds the page and ``gradio_app.engine`` the work.
"""
