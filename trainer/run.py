"""Entry point: ``python trainer/run.py --config trainer/configs/NAME.yaml [key=value ...]``.

Run as a script, Python puts this file's folder (``trainer/``) first on ``sys.path``, which
would make ``trainer``/``vpdsr`` unimportable (unless installed) and let our module names
(``data``, ``config``) shadow top-level ones. So the script swaps that entry for the checkout's
root, computed from this file: the checkout you run is the code that runs, installed or not.
"""

import sys
from pathlib import Path

if __name__ == "__main__" and not __package__:
    _here = Path(__file__).resolve().parent
    sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _here]
    sys.path.insert(0, str(_here.parent))

from trainer.cli import main  # noqa: E402  (after the path fix above)

if __name__ == "__main__":
    sys.exit(main())
