"""`radixlm serve` / `python -m radixlm.launch_server`: the OpenAI-compatible HTTP server.

Engine flags come from EngineConfig (radixlm/cli_args.py); this adds the network ones. The Engine is
built before the port opens, so once a client can connect, /health answers 200. On SIGTERM or SIGINT
the server stops accepting, gives running requests --shutdown-timeout seconds, ends the rest with an
OpenAI-style error (server/drain.py), and the app's shutdown stops the engine core, so no process is left
behind. Request size and header limits: server/limits.py.
"""

from __future__ import annotations

import argparse
import logging
import sys

import uvicorn

from radixlm.server.drain import DEFAULT_SHUTDOWN_TIMEOUT_S, DrainingServer
from radixlm.server.limits import LimitedApp, add_limit_args, limits_from_args
from radixlm.server.parsers import REASONING_PARSERS, TOOL_PARSERS
from radixlm.server.startup import UserError, add_startup_args, reserve_port, resolve_model


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
    net.add_argument(
        "--shutdown-timeout",
        type=float,
        default=DEFAULT_SHUTDOWN_TIMEOUT_S,
        help="Seconds running requests get to finish after SIGTERM; those still running then end with a "
        f"503 error (default: {DEFAULT_SHUTDOWN_TIMEOUT_S:g}).",
    )
    net.add_argument(
        "--tool-call-parser",
        default=None,
        choices=sorted(TOOL_PARSERS),
        help="How tool calls are written in the model's text, for tool_choice auto: hermes (qwen, qwen25: "
        "<tool_call> JSON), llama3 (llama3_json), mistral ([TOOL_CALLS]), pythonic "
        "(default: the chat template's format, when only one format's marker is in it).",
    )
    net.add_argument(
        "--reasoning-parser",
        default=None,
        choices=sorted(REASONING_PARSERS),
        help="Split <think> reasoning into reasoning_content: deepseek-r1 (deepseek_r1), qwen3 "
        "(default: none; reasoning stays in content).",
    )
    add_limit_args(net)
    add_startup_args(parser, net)
    add_engine_args(parser)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    ns = parser.parse_args(argv)
    from radixlm.cli_args import config_from_args

    try:
        model_notice = resolve_model(ns)
    except UserError as exc:
        return _user_error(exc)
    try:
        config = config_from_args(ns)
    except (ValueError, TypeError) as exc:
        parser.error(str(exc))
    if config.node_rank > 0:
        # A follower node runs its tensor-parallel ranks only; node 0 schedules and serves.
        from radixlm.model.parallel import run_follower_node

        return run_follower_node(config)
    if not 0 <= ns.port <= 65535:
        parser.error(f"--port must be in [0, 65535], got {ns.port}")
    if not ns.shutdown_timeout >= 0:
        parser.error(f"--shutdown-timeout must be >= 0, got {ns.shutdown_timeout}")
    try:
        limits = limits_from_args(ns)
    except ValueError as exc:
        parser.error(str(exc))

    try:
        sock = reserve_port(ns.host, ns.port)
    except UserError as exc:
        return _user_error(exc)

    from radixlm import Engine
    from radixlm.server.app import create_app

    try:
        engine = Engine(**vars(config))
    except (ValueError, OSError) as exc:  # a wrong path, a folder without weights, a bad option value
        sock.close()
        if config.log_level == "debug":
            raise
        return _user_error(exc)
    if model_notice:
        logging.getLogger("radixlm").info("%s", model_notice)
    try:
        app = create_app(
            engine,
            served_model_name=ns.served_model_name,
            api_key=ns.api_key,
            enable_metrics=config.enable_metrics,
            strict_model_name=ns.strict_model_name,
            metrics_prefixes=tuple(ns.metrics_prefix),
            tool_call_parser=ns.tool_call_parser,
            reasoning_parser=ns.reasoning_parser,
        )
        server = _Server(
            uvicorn.Config(
                LimitedApp(app, limits),
                host=ns.host,
                port=ns.port,
                log_level=config.log_level,
                # One line per request drowns the log under load; debug turns it on.
                access_log=config.log_level == "debug",
                **limits.uvicorn_options(),
            ),
            app.state.ctx,
            ns.shutdown_timeout,
        )
        server.run(sockets=[sock])
        return 0 if server.started else 1
    finally:
        sock.close()
        engine.shutdown()  # a no-op after the app's own shutdown; covers a failed start


def _user_error(exc: BaseException) -> int:
    """One line for a user's mistake (--log-level debug shows the traceback instead)."""
    print(f"radixlm serve: error: {exc}", file=sys.stderr)
    return 2


class _Server(DrainingServer):
    """The draining uvicorn.Server that prints one clear line once the socket accepts connections."""

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
