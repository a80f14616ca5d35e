"""The command line: `edgepanel SUBCOMMAND ...` (also `python -m edgepanel`)."""
from __future__ import annotations

import argparse
import platform
import sys


def cmd_info(args) -> int:
    from . import __version__, kernels
    from .kernels import _cffi

    print(f"edgepanel {__version__} on {platform.machine()} ({platform.system()}), Python {platform.python_version()}")
    print(f"kernels:   {kernels.info()}")
    print(f"compiled:  {', '.join(_cffi.compiled_isas()) or 'none (C extension not built)'}")
    print(f"runnable:  {', '.join(b if i is None else f'{b}/{i}' for b, i in kernels.available())}")
    if _cffi.lib is not None:
        print(f"cpus:      {_cffi.lib.ep_cpu_count()}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="edgepanel", description=__doc__)
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    s = sub.add_parser("info", help="show the kernel backend, ISA variant and machine")
    s.set_defaults(func=cmd_info)
    return p


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
