"""Thin wrapper for ``ray submit cluster.yaml scripts/run_sweep.py -- --manifest search_spaces/X.yaml``.

``ray submit`` copies this file to the head node's home directory and runs it from there, so
relative manifest paths are resolved against the project checkout (``~/sweeper`` on the cluster,
installed in editable mode by cluster.yaml's setup commands). The cluster is joined with
``address="auto"`` unless ``--address`` or ``RAY_ADDRESS`` says otherwise.
"""

import os
import sys
from pathlib import Path


def main() -> int:
    import sweeper
    from sweeper.cli import main as cli_main

    checkout = Path(sweeper.__file__).resolve().parents[1]
    if (checkout / "search_spaces").is_dir():
        os.chdir(checkout)
    os.environ.setdefault("RAY_ADDRESS", "auto")
    return cli_main(sys.argv[1:])


if __name__ == "__main__":
    sys.exit(main())
