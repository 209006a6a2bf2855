"""``python -m bench dataservice``: run a tf.data service dispatcher or worker until Ctrl-C.

Start one dispatcher, then one worker per spare CPU host (or several on one host), then
train with ``--data-service grpc://DISPATCHER_HOST:PORT``::

    python -m bench dataservice dispatcher --port 5050
    python -m bench dataservice worker --dispatcher dispatcher-host:5050 --port 5051

Workers read the training files by the trainer's paths: put the data at the same path on
every worker host.
"""

from __future__ import annotations

import argparse
import sys
import time

from flowers_fast.clikit import OneLineParser, run_main
from flowers_fast.errors import invoked

DESCRIPTION = ("Serve the training input pipeline from other processes or hosts (tf.data service). "
               "Start one dispatcher, then workers, then train with --data-service grpc://HOST:PORT.")


def _port(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a port number, got {text!r}") from None
    if not 0 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"must be 0..65535 (0 picks a free port), got {value}")
    return value


def _serve(server, what: str) -> int:
    """Block until Ctrl-C. (``server.join()`` blocks in C++ where Ctrl-C cannot reach Python.)"""
    print(f"{what}; Ctrl-C to stop", flush=True)
    while True:
        time.sleep(1)


def cmd_dispatcher(args) -> int:
    from flowers_fast import runtime

    runtime.hide_gpus_early()  # the dispatcher only coordinates; a GPU would be wasted on it
    from flowers_fast import distribute

    server = distribute.dispatcher(args.port)
    port = server.target.rsplit(":", 1)[1]
    return _serve(server, f"tf.data service dispatcher listening on port {port} "
                          f"(trainers: --data-service grpc://THIS_HOST:{port}; "
                          f"workers: --dispatcher THIS_HOST:{port})")


def cmd_worker(args) -> int:
    from flowers_fast import runtime

    runtime.hide_gpus_early()  # workers decode on the CPU
    from flowers_fast import distribute

    server = distribute.worker(args.port, args.dispatcher, f"{args.host}:%port%" if args.host else None)
    port = server._address.rsplit(":", 1)[1]  # the bound port, also when --port 0
    return _serve(server, f"tf.data service worker listening on port {port}, registered with "
                          f"dispatcher {args.dispatcher}")


def _fill(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="role", required=True, metavar="{dispatcher,worker}")
    p = sub.add_parser("dispatcher", help="hand out the training data to workers (one per cluster)")
    p.add_argument("--port", type=_port, default=5050, help="port to listen on (default 5050; 0: a free one)")
    p.set_defaults(func=cmd_dispatcher)

    p = sub.add_parser("worker", help="run the input pipeline (decode, cache, shuffle, batch) for trainers")
    p.add_argument("--dispatcher", required=True, metavar="HOST:PORT", help="the dispatcher, e.g. localhost:5050")
    p.add_argument("--port", type=_port, default=5051, help="port to listen on (default 5051; 0: a free one)")
    p.add_argument("--host", metavar="NAME",
                   help="host name trainers use to reach this worker (default: localhost when the dispatcher is "
                        "on localhost, else this machine's name)")
    p.set_defaults(func=cmd_worker)


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Register ``dataservice`` on the bench CLI's subparsers."""
    p = subparsers.add_parser("dataservice", help="run a tf.data service dispatcher or worker",
                              description=DESCRIPTION)
    _fill(p)
    return p


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(prog=f"{invoked('bench')} dataservice", description=DESCRIPTION)
    _fill(parser)
    return parser


def main(argv=None) -> int:
    """``argv`` is what follows ``dataservice``: ``dispatcher --port 5050`` or ``worker --dispatcher ...``."""
    return run_main(build_parser(), argv)


if __name__ == "__main__":
    sys.exit(main())
