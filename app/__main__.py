"""The `medzero` command: `medzero serve [--demo]`."""
import argparse
import logging
import sys

from app.errors import MedzeroError
from app.settings import Settings

log = logging.getLogger("medzero")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="medzero", description="Zero-shot medical image classification.")
    commands = parser.add_subparsers(dest="command", required=True)
    serve = commands.add_parser("serve", help="run the HTTP server")
    serve.add_argument("--demo", action="store_true",
                       help="serve the tiny bundled model when the configured weights are not on this machine")
    serve.add_argument("--host", help="bind address (MEDZERO_HOST)")
    serve.add_argument("--port", type=int, help="port (MEDZERO_PORT)")
    serve.add_argument("--model-name", help="open_clip model id (MEDZERO_MODEL_NAME)")
    serve.add_argument("--pretrained", help="pretrained tag or checkpoint path (MEDZERO_PRETRAINED)")
    serve.add_argument("--data-dir", help="where the database and indexes live (MEDZERO_DATA_DIR)")
    args = parser.parse_args(argv)

    overrides = {key: value for key, value in vars(args).items() if key != "command" and value not in (None, False)}
    try:
        settings = Settings(**overrides)
    except ValueError as exc:   # pydantic's ValidationError names the bad MEDZERO_ variable
        print(f"medzero: invalid configuration: {exc}", file=sys.stderr)
        return 2
    logging.basicConfig(level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.command == "serve":
        return serve_forever(settings)
    return 2


def serve_forever(settings: Settings) -> int:
    import uvicorn

    from app.main import create_app

    failure: list[MedzeroError] = []

    def stop_on_failure(exc: MedzeroError) -> None:
        failure.append(exc)
        server.should_exit = True

    app = create_app(settings, on_startup_failure=stop_on_failure)
    config = uvicorn.Config(app, host=settings.host, port=settings.port, log_level=settings.log_level,
                            timeout_graceful_shutdown=30)
    server = uvicorn.Server(config)
    server.run()
    if failure:
        print(f"medzero: cannot start: {failure[0]}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
