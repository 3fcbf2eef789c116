"""Write (or check) the committed OpenAPI document, docs/openapi.json.

    python -m sandvm.server.openapi            # regenerate docs/openapi.json
    python -m sandvm.server.openapi --check    # exit 1 if it differs from the code
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from sandvm.server.app import openapi_document

DEFAULT_PATH = Path(__file__).resolve().parents[3] / "docs" / "openapi.json"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m sandvm.server.openapi")
    p.add_argument("path", nargs="?", type=Path, default=DEFAULT_PATH)
    p.add_argument("--check", action="store_true", help="compare instead of writing")
    args = p.parse_args(argv)
    doc = openapi_document()
    if args.check:
        current = args.path.read_text() if args.path.exists() else ""
        if current != doc:
            print(f"{args.path} is out of date: run `python -m sandvm.server.openapi`",
                  file=sys.stderr)
            return 1
        return 0
    args.path.write_text(doc)
    print(f"wrote {args.path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
