"""Server-side entry point: ``python -m bench.serve KIND --ready FILE ...``.

Starts one echo server of the given kind, writes ``FILE`` (JSON with at least
``pid``) once it accepts calls, and serves until killed, until its parent goes
away, or until ``--lifetime`` seconds pass.
"""

from __future__ import annotations

import argparse
import functools
import logging

from bench import systems


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.serve")
    parser.add_argument("kind", help="server kind, e.g. tcp-floor, grpc-sync")
    parser.add_argument("--ready", required=True, help="file to write when serving")
    parser.add_argument("--reply-size", type=int, default=8, help="bytes in every reply")
    parser.add_argument("--lifetime", type=float, default=1200.0, help="exit after this long")
    args, extra = parser.parse_known_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s %(message)s")
    table = systems.servers()
    if args.kind not in table:
        parser.error(f"unknown server kind {args.kind!r}; known: {', '.join(sorted(table))}")
    serve = systems.load_object(table[args.kind])
    serve(args, extra, functools.partial(systems.write_ready, args.ready))


if __name__ == "__main__":
    main()
