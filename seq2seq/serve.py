"""``seq2seq-serve``: a model bundle behind an HTTP API, with a web page at ``/``.

Usage::

    seq2seq-serve model=BUNDLE [host=127.0.0.1] [port=8000] [api_key=KEY]
        [decode.beam_size=5] [max_batch_sentences=64] [max_wait_ms=50] [max_queue=256]
        [timeout=30] [max_lines=64] [max_chars=1000] [workers=1] [threads=1] [device=cpu]
        [header_timeout=10] [body_timeout=30] [max_connections=512] [drain_timeout=30]

The API is described in `seq2seq.service.app` and served as OpenAPI at ``/docs``.
``port=0`` picks a free port. Once the model is loaded and the port is bound, one
line ``seq2seq-serve: listening on http://HOST:PORT/`` goes to stderr. SIGTERM or
Ctrl-C stops accepting connections, answers every request already received, then
exits; connections still open ``drain_timeout`` seconds later are cut. Slow
clients are cut too: a request head must arrive within ``header_timeout`` seconds,
its body within ``body_timeout``; at most ``max_connections`` are open at once.
A bundle that cannot be loaded or a port that cannot be bound ends the app with
one ``error: ...`` line and exit code 2.
"""

from __future__ import annotations

import importlib.util
import resource
import socket
import sys
from typing import Any

import hydra
import torch
from omegaconf import DictConfig

from seq2seq._hydra import expected_errors, register_configs, run_hydra, to_app
from seq2seq.config import ServeApp, conf_dir
from seq2seq.decoding.translator import Translator

register_configs()


def bind(host: str, port: int) -> socket.socket:
    """The listening socket, bound here so that ``port=0`` can report the port it got."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    # Accepted connections inherit it: without it, a response written in two parts
    # waits for the client's delayed ACK (about 40 ms) on a kept-alive connection.
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        raise OSError(f"cannot listen on {host}:{port}: {e.strerror or e}") from e
    # Listening before the server starts: a client told the address at once is
    # queued until the app is up, not refused.
    sock.listen(BACKLOG)
    return sock


SERVER_PACKAGES = ("fastapi", "fastapi_offline", "uvicorn")
BACKLOG = 2048
SPARE_DESCRIPTORS = 64  # the bundle, logs, the listening socket, threads' pipes


def require_server_packages() -> None:
    """The server's packages are an optional extra: say how to get them."""
    missing = [name for name in SERVER_PACKAGES if importlib.util.find_spec(name) is None]
    if missing:
        raise ImportError(
            f"seq2seq-serve needs {' and '.join(missing)}: pip install 'seq2seq[serve]'"
        )


def reserve_descriptors(connections: int) -> None:
    """Raise the soft limit on open files to fit ``connections`` clients, or fail
    naming the setting: the cap only protects the process if it is below the limit."""
    needed = connections + SPARE_DESCRIPTORS
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < needed:
        if hard != resource.RLIM_INFINITY and hard < needed:
            raise ValueError(
                f"max_connections={connections} needs {needed} open files but this "
                f"process may open {hard} (ulimit -n); lower max_connections"
            )
        resource.setrlimit(resource.RLIMIT_NOFILE, (needed, hard))


def server_config(app: Any, config: ServeApp) -> Any:
    """uvicorn's settings: timeouts and caps against slow or numerous clients
    (see `seq2seq.service.server`), and a bounded drain on SIGTERM."""
    import uvicorn

    from seq2seq.service.server import guarded_protocol, limit_log_floods

    protocol = guarded_protocol(
        header_timeout=config.header_timeout, max_connections=config.max_connections
    )
    settings = uvicorn.Config(
        app,
        http=protocol,
        ws="none",
        log_level=config.log_level,
        access_log=False,
        timeout_keep_alive=config.keep_alive_timeout,  # type: ignore[arg-type]
        timeout_graceful_shutdown=config.drain_timeout,  # type: ignore[arg-type]
        h11_max_incomplete_event_size=config.max_header_bytes,
    )
    limit_log_floods()
    return settings


def run(config: ServeApp) -> None:
    """Load the bundle, bind the port, serve until SIGTERM or Ctrl-C."""
    require_server_packages()
    import uvicorn

    from seq2seq.service.app import check_config, create_app, describe_bundle

    check_config(config)
    reserve_descriptors(config.max_connections)
    if config.threads > 0:
        torch.set_num_threads(config.threads)
    translator = Translator.from_bundle(config.model, decode=config.decode, device=config.device)
    app = create_app(translator, config, describe_bundle(config.model, translator))
    sock = bind(config.host, config.port)
    host, port = sock.getsockname()[:2]
    shown = f"[{host}]" if ":" in host else host
    print(f"seq2seq-serve: listening on http://{shown}:{port}/", file=sys.stderr, flush=True)
    server = uvicorn.Server(server_config(app, config))
    server.run(sockets=[sock])


@hydra.main(version_base="1.3", config_path=conf_dir(), config_name="serve")
def _app(cfg: DictConfig) -> None:
    with expected_errors():
        run(to_app(cfg, ServeApp, required={"model": "BUNDLE"}))


def main() -> None:
    """Console entry point: ``seq2seq-serve``."""
    run_hydra(_app)


if __name__ == "__main__":
    main()
