"""The `moeops` command: `moeops registry ...` (the model registry CLI), `moeops promote ...` (gate -> registry),
`moeops serve ...` (the OpenAI-compatible server of a registry model). Also `python -m moeops ...`."""

from __future__ import annotations

import sys

from moeops.cli import UserError, run_main

USAGE = "usage: moeops {registry,promote,serve} ...  (moeops COMMAND --help for more)"


def _dispatch(argv: list[str]) -> None:
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE)
        return
    cmd, rest = argv[0], argv[1:]
    if cmd == "registry":
        from moeops.registry.__main__ import main

        main(rest, prog="moeops registry")
    elif cmd == "promote":
        from moeops.registry.promotion import main

        main(rest)
    elif cmd == "serve":
        from moeops.serve.server import main

        main(rest)
    else:
        raise UserError(f"unknown command {cmd!r}; {USAGE}")


def main(argv: list[str] | None = None) -> None:
    """Console-script entry point: user errors become one `error:` line and exit 2."""
    run_main(lambda: _dispatch(sys.argv[1:] if argv is None else list(argv)))


if __name__ == "__main__":
    main()
