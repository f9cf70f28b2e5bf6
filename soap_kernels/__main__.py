"""``python -m soap_kernels``: which backends run here and what ``backend="auto"`` picks."""

from __future__ import annotations

import argparse
import json

from ._info import backend_info, format_info


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m soap_kernels", description=__doc__)
    parser.add_argument("--device", default=None, help="device to report the auto choice for (default: cuda if present)")
    parser.add_argument("--json", action="store_true", help="print JSON instead of text")
    args = parser.parse_args()
    info = backend_info(args.device)
    print(json.dumps(info, indent=2) if args.json else format_info(info))


if __name__ == "__main__":
    main()
