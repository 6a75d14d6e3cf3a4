"""``python -m anomret.serve PACKAGE --port PORT``: a model package as an HTTP scoring service.

``POST /predict`` (multipart field ``image``) answers score, label, threshold and defect mask; ``GET /health``
and ``GET /ready`` tell a supervisor whether the process is up and the model loaded (see
:mod:`anomret.serving`). The package is verified (format and digests) before the port opens; the model is
built after it, while ``/ready`` answers 503.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

from anomret.cli import user_errors


def parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m anomret.serve",
        description="Serve a model package (python -m anomret.export) over HTTP: POST /predict, GET /health, GET /ready.",
    )
    parser.add_argument("package", help="the model package folder")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=8000, help="port to listen on (default 8000)")
    parser.add_argument(
        "--device", default=None, help="cpu, cuda, cuda:1, ... (default: CUDA when available)"
    )
    parser.add_argument(
        "--max-batch-size", type=int, default=8, help="images scored in one forward pass at most (default 8)"
    )
    parser.add_argument(
        "--batch-timeout-ms",
        type=float,
        default=0.0,
        help="wait this long for more requests before a pass (default 0: take what is waiting)",
    )
    parser.add_argument(
        "--max-queue", type=int, default=256, help="requests waiting at most; more get 503 (default 256)"
    )
    parser.add_argument(
        "--max-request-mb", type=float, default=20.0, help="largest request body in MiB (default 20)"
    )
    parser.add_argument(
        "--max-pixels", type=int, default=40_000_000, help="largest image in pixels (default 40,000,000)"
    )
    parser.add_argument("--min-side", type=int, default=16, help="smallest image side in pixels (default 16)")
    parser.add_argument("--access-log", action="store_true", help="log every request")
    return parser


def main(argv: Sequence[str] | None = None) -> None:
    args = parser().parse_args(sys.argv[1:] if argv is None else argv)
    with user_errors(hydra=False):
        logging.basicConfig(level=logging.INFO, format="[%(asctime)s][%(name)s][%(levelname)s] - %(message)s")
        if not 0 < args.port < 65536:
            raise ValueError(f"--port must be in 1..65535, got {args.port}")
        for name, value in (
            ("--max-batch-size", args.max_batch_size),
            ("--max-request-mb", args.max_request_mb),
        ):
            if value <= 0:
                raise ValueError(f"{name} must be positive, got {value}")
        import uvicorn  # the heavy imports, only once it runs

        from anomret.output import configure_output
        from anomret.package import open_package
        from anomret.serving import Limits, Service, create_app

        configure_output()
        open_package(args.package)  # a damaged or foreign package is refused before the port opens
        failures: list[BaseException] = []

        def stop(error: BaseException) -> None:  # the model cannot be built: stop serving, say why
            failures.append(error)
            server.should_exit = True

        service = Service(
            args.package,
            args.device,
            Limits(
                max_request_bytes=int(args.max_request_mb * 1024 * 1024),
                max_pixels=args.max_pixels,
                min_side=args.min_side,
            ),
            max_batch_size=args.max_batch_size,
            batch_timeout_s=args.batch_timeout_ms / 1000,
            max_queue=args.max_queue,
            on_failure=stop,
        )
        server = uvicorn.Server(
            uvicorn.Config(
                create_app(service),
                host=args.host,
                port=args.port,
                log_level="warning",
                access_log=args.access_log,
                timeout_graceful_shutdown=10,
            )
        )
        print(
            f"serving {args.package} on http://{args.host}:{args.port} (POST /predict, GET /ready)",
            flush=True,
        )
    # uvicorn handles SIGTERM and SIGINT itself: it finishes the requests in flight, then stops.
    try:
        server.run()
    except KeyboardInterrupt:
        raise SystemExit(130) from None
    if failures:
        with user_errors(hydra=False):
            raise failures[0]
        raise SystemExit(1)


if __name__ == "__main__":
    main()
