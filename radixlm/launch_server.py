"""`radixlm serve` / `python -m radixlm.launch_server`: the OpenAI-compatible HTTP server.

Engine flags come from EngineConfig (radixlm/cli_args.py); this adds the network ones. The Engine is
built before the port opens, so once a client can connect, /health answers 200. SIGTERM and SIGINT are
uvicorn's: it stops accepting, gives open requests a few seconds, and the app's shutdown stops the engine
core, so no process is left behind.
"""

from __future__ import annotations

import argparse
import sys

import uvicorn

# Seconds open requests get to finish after SIGTERM before their connections are closed.
GRACEFUL_SHUTDOWN_S = 5


def build_parser() -> argparse.ArgumentParser:
    from radixlm.cli_args import add_engine_args

    parser = argparse.ArgumentParser(
        prog="radixlm serve",
        description="Serve a model over HTTP: OpenAI-compatible /v1/completions, /v1/chat/completions and "
        "/v1/models, plus SGLang's native /generate, /health, /get_model_info, /get_server_info, "
        "/flush_cache, /abort_request and /metrics.",
    )
    net = parser.add_argument_group("server")
    net.add_argument("--host", default="127.0.0.1", help="Address to listen on (default: 127.0.0.1).")
    net.add_argument("--port", type=int, default=30000, help="Port to listen on (default: 30000).")
    net.add_argument(
        "--served-model-name",
        default=None,
        help="The model name clients send as `model` and /v1/models lists (default: the model path).",
    )
    net.add_argument(
        "--api-key",
        default=None,
        help="Require `Authorization: Bearer <key>` on every route except /health and /metrics.",
    )
    add_engine_args(parser)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    ns = parser.parse_args(argv)
    from radixlm.cli_args import config_from_args

    try:
        config = config_from_args(ns)
    except (ValueError, TypeError) as exc:
        parser.error(str(exc))
    if not 0 <= ns.port <= 65535:
        parser.error(f"--port must be in [0, 65535], got {ns.port}")

    from radixlm import Engine
    from radixlm.server.app import create_app

    engine = Engine(**vars(config))
    try:
        app = create_app(
            engine,
            served_model_name=ns.served_model_name,
            api_key=ns.api_key,
            enable_metrics=config.enable_metrics,
        )
        server = _Server(
            uvicorn.Config(
                app,
                host=ns.host,
                port=ns.port,
                log_level=config.log_level,
                # One line per request drowns the log under load; debug turns it on.
                access_log=config.log_level == "debug",
                timeout_graceful_shutdown=GRACEFUL_SHUTDOWN_S,
            )
        )
        server.run()
        return 0 if server.started else 1
    finally:
        engine.shutdown()  # a no-op after the app's own shutdown; covers a failed start (port in use)


class _Server(uvicorn.Server):
    """uvicorn.Server that prints one clear line once the socket accepts connections."""

    async def startup(self, sockets: list | None = None) -> None:
        await super().startup(sockets)
        if not self.started or self.should_exit:
            return
        host, port = self.config.host, self.config.port
        for server in self.servers:
            for sock in server.sockets:  # the real port when --port 0
                host, port = sock.getsockname()[:2]
                break
        shown = f"[{host}]" if ":" in str(host) else host
        print(f"radixlm server ready at http://{shown}:{port}", flush=True)


if __name__ == "__main__":
    sys.exit(main())
