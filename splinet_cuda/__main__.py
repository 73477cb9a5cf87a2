"""``python -m splinet_cuda info`` (what this installation is) and ``python -m splinet_cuda
selftest`` (every backend against the float64 reference): the first commands to run on a
new machine, and the output to paste into a bug report."""
from __future__ import annotations

import argparse
import sys
from typing import Optional, Sequence


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m splinet_cuda", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    sub.add_parser("info", help="versions, the build, the backends of each device and why the others do not run")
    from . import _selftest

    _selftest.add_arguments(sub.add_parser("selftest", help="every backend against the float64 reference; "
                                           "exit status 1 on a failure"))
    args = p.parse_args(argv)
    if args.command == "info":
        from ._info import info_text

        print(info_text(), end="")
        return 0
    return _selftest.main(args)


if __name__ == "__main__":
    sys.exit(main())
