"""``vpdsr demo``: the demo's subcommand, added to the core CLI through an entry point.

Only argparse is imported here: the core builds its parser by calling ``register`` on every
``vpdsr --help``, and gradio takes seconds to import, so it is imported when the demo starts.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from gradio_app.config import add_arguments, config_from_args

DESCRIPTION = "Start the vpdsr browser demo (Gradio) on this machine; open the printed address in a browser."


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add ``demo`` to the ``vpdsr`` command (the ``vpdsr.commands`` entry point)."""
    parser = subparsers.add_parser("demo", help="start the browser demo (Gradio)", description=DESCRIPTION)
    add_arguments(parser)
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Serve until Ctrl-C. gradio's own banner is silenced: its "set `share=True` in `launch()`"
    hint speaks to Python callers, and the demo never shares; one line of ours gives the address."""
    config = config_from_args(args)
    from gradio_app.app import build_demo, launch_demo

    demo = build_demo(config)
    try:
        _, url, _ = launch_demo(demo, config, prevent_thread_lock=True, quiet=True)
    except OSError as err:  # gradio's "Cannot find empty port" is an OSError too
        print(f"vpdsr demo: cannot listen on {config.host}:{config.port} ({err}); pick another --port", file=sys.stderr)
        return 1
    print(f"vpdsr demo running at {url} (Ctrl-C stops it)", flush=True)
    demo.block_thread()
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m gradio_app`` and ``python gradio_app/app.py``."""
    parser = argparse.ArgumentParser(prog="python -m gradio_app", description=DESCRIPTION)
    add_arguments(parser)
    return run(parser.parse_args(argv))
