"""`python -m dsv4.server --model DIR ...`: the same as `dsv4 serve --model DIR ...` (one parser, the CLI's)."""

from __future__ import annotations

import sys

from ..cli import main as cli_main


def main(argv: list[str] | None = None) -> int:
    return cli_main(["serve", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    sys.exit(main())
