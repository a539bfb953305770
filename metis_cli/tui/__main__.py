"""`python -m metis_cli.tui RUN_DIR`: the same as `metis watch RUN_DIR`, without the CLI around it."""

from __future__ import annotations

import sys
from pathlib import Path

from metis_cli.errors import MetisError
from metis_cli.tui.launch import watch


def main(argv: list[str]) -> int:
    if len(argv) != 1 or argv[0] in ("-h", "--help"):
        print("usage: python -m metis_cli.tui RUN_DIR", file=sys.stderr)
        return 2
    try:
        return watch(Path(argv[0]))
    except MetisError as error:
        print(f"error: {error}", file=sys.stderr)
        return error.exit_code


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
