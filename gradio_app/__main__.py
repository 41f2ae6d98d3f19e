"""``python -m gradio_app``: start the demo."""

from gradio_app.cli import main

raise SystemExit(main())
