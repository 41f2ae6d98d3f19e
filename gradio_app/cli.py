"""``vpdsr demo``: the demo's subcommand, added to the core CLI through an entry point.

Only the standard library is imported here: the core builds its parser by calling ``register`` on every
``vpdsr --help``, and gradio takes seconds to import, so it is imported when the demo starts.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

from gradio_app.config import add_arguments, config_from_args

DESCRIPTION = "Start the vpdsr browser demo (Gradio) on this machine; open the printed address in a browser."


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add ``demo`` to the ``vpdsr`` command (the ``vpdsr.commands`` entry point)."""
    parser = subparsers.add_parser("demo", help="start the browser demo (Gradio)", description=DESCRIPTION)
    add_arguments(parser)
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Serve until Ctrl-C or SIGTERM, which schedulers and ``docker stop`` send: both stop the
    running jobs within a tile and remove every file the demo wrote. gradio's own banner is
    silenced: its "set `share=True` in `launch()`" hint speaks to Python callers, and the demo
    never shares; one line of ours gives the address."""
    config = config_from_args(args)
    workdir = _work_folder()
    signal.signal(signal.SIGTERM, _interrupt)
    models = demo = None
    try:
        from gradio_app.app import build_demo, launch_demo
        from gradio_app.engine import DemoModels

        models = DemoModels(config)
        demo = build_demo(config, workdir / "results", models)
        try:
            _, url, _ = launch_demo(demo, config, prevent_thread_lock=True, quiet=True)
        except OSError as err:  # gradio's "Cannot find empty port" is an OSError too
            where = f"{config.host}:{config.port}"
            print(f"vpdsr demo: cannot listen on {where} ({err}); pick another --port", file=sys.stderr)
            return 1
        print(f"vpdsr demo running at {url} (Ctrl-C stops it)", flush=True)
        while demo.is_running:  # gradio's block_thread, without its closing: ours follows
            time.sleep(0.1)
    except KeyboardInterrupt:
        print("vpdsr demo: stopping", flush=True)
    finally:
        for signum in (signal.SIGINT, signal.SIGTERM):  # a second Ctrl-C must not skip the clean-up
            signal.signal(signum, signal.SIG_IGN)
        # the jobs first, so that no worker writes into the folder once it is gone; then the
        # server, whose close() also ends the open pages' streams instead of waiting for them
        if models is not None:
            models.jobs.close()
        if demo is not None:
            demo.close(verbose=False)
        shutil.rmtree(workdir, ignore_errors=True)
    return 0


def _work_folder() -> Path:
    """A folder of the demo's own for its results and gradio's cache, so that removing it removes
    every file the demo wrote. It is made inside ``$GRADIO_TEMP_DIR`` when that is set, so files
    stay where the user asked, and gradio is pointed at its ``gradio`` subfolder: gradio reads the
    variable when it builds the page and saves files, all after this."""
    parent = os.environ.get("GRADIO_TEMP_DIR") or None
    if parent:
        Path(parent).mkdir(parents=True, exist_ok=True)
    folder = Path(tempfile.mkdtemp(prefix="vpdsr-demo-", dir=parent))
    os.environ["GRADIO_TEMP_DIR"] = str(folder / "gradio")
    return folder


def _interrupt(signum: int, frame: object) -> None:
    """SIGTERM takes Ctrl-C's path: Python's default would end the process without any clean-up."""
    raise KeyboardInterrupt


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m gradio_app`` and ``python gradio_app/app.py``."""
    parser = argparse.ArgumentParser(prog="python -m gradio_app", description=DESCRIPTION)
    add_arguments(parser)
    return run(parser.parse_args(argv))
