"""``python -m server``: start the Latent Edit server (see ``--help`` and docs/protocol.md).

When it listens it prints one line to stdout that plugins and tests wait for::

    latent-edit server ready at http://127.0.0.1:8765/
"""
from __future__ import annotations

import argparse
import asyncio
import importlib
import ipaddress
import logging
import os
import signal
import sys
from pathlib import Path

from aiohttp.abc import AbstractAccessLogger

from core.paths import default_data_dir  # one definition, shared with the plugins and install.py
from server.launch import ready_line
from server.storage import Retention

DEFAULT_PORT = 8765


def port_number(text: str) -> int:
    value = int(text)
    if not 0 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"{value} is not a TCP port (0..65535)")
    return value


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m server", description="Latent Edit local server (aiohttp + msgpack).")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1; anything else is "
                                                       "reachable from the network: the token is then all that protects it)")
    p.add_argument("--port", type=port_number, default=DEFAULT_PORT, help=f"TCP port (default {DEFAULT_PORT}; 0 = any free port)")
    p.add_argument("--data-dir", type=Path, default=None,
                   help=f"sessions, job inputs, SQLite and the token (default {default_data_dir()})")
    p.add_argument("--token-file", type=Path, default=None, help="bearer token file (default DATA_DIR/token; "
                                                                 "created with mode 0600 when missing)")
    p.add_argument("--models-dir", type=Path, default=None,
                   help="folder scanned for extra generator checkpoints (default DATA_DIR/models)")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                   help="torch device (default auto: cuda when available, else cpu)")
    p.add_argument("--log-level", default="info", choices=("debug", "info", "warning", "error"),
                   help="log verbosity on stderr (default info)")
    p.add_argument("--max-body-mb", type=float, default=None,
                   help="largest request body in MiB (default: what the largest allowed layer needs, a 4096² "
                        "rgbaf32 layer with its float selection: 320.06)")
    p.add_argument("--max-queue", type=int, default=16, help="jobs that may wait in the queue (default 16; more: 429)")
    p.add_argument("--job-timeout", type=float, default=3600.0, help="default per-job time limit in s (default 3600)")
    p.add_argument("--cache-mb", type=float, default=4096.0,
                   help="disk budget for sessions and kept inputs in MiB; least recently used are evicted (default 4096)")
    p.add_argument("--live-sessions", type=int, default=4, help="finished sessions kept loaded in memory (default 4)")
    p.add_argument("--keep-days", type=float, default=Retention.max_age_days,
                   help=f"finished jobs and sessions unused this long are removed (default {Retention.max_age_days:g})")
    p.add_argument("--keep-jobs", type=int, default=Retention.max_jobs,
                   help=f"finished jobs kept at most, newest first (default {Retention.max_jobs}); all within --cache-mb")
    p.add_argument("--max-connections", type=int, default=256,
                   help="open connections at most (default 256; kept below the open-file limit); "
                        "above it the oldest idle connection is closed")
    p.add_argument("--header-timeout", type=float, default=10.0,
                   help="seconds a client has to send its request headers (default 10)")
    ray = p.add_argument_group("Ray backend (python3 install.py --with ray)")
    ray.add_argument("--backend", choices=("local", "ray"), default="local",
                     help="where inversions and renders run: local (this process, one job at a time; default) or "
                          "ray (actors on a Ray cluster, one job per worker; docs/scaleout.md)")
    ray.add_argument("--ray-address", default="auto",
                     help="Ray cluster to join (default auto: the cluster started on this machine with `ray start`)")
    ray.add_argument("--ray-workers", type=int, default=None,
                     help="worker actors (default: one per GPU of the cluster, else one per --ray-threads CPUs)")
    ray.add_argument("--ray-threads", type=int, default=1, help="torch threads per CPU worker (default 1)")
    ray.add_argument("--ray-retries", type=int, default=2,
                     help="re-runs of a job whose worker was lost mid-job before it fails with worker_lost (default 2)")
    p.add_argument("--engine", default=None, help=argparse.SUPPRESS)  # tests: MODULE:FACTORY, factory(args) -> engine
    return p


class AccessLogger(AbstractAccessLogger):
    """One line per request, without the query string (it may carry the status page token); the path is
    shortened, and control characters in it are escaped by the log formatter (server.net.EscapingFormatter)."""

    def log(self, request, response, time):
        self.logger.info("%s %s %s %.1fms", request.method[:16], request.path[:300], response.status, time * 1000)


def lock_data_dir(data_dir: Path):
    """Hold an exclusive lock on DATA_DIR/server.lock for the process lifetime (one server per data dir:
    a second one would mark the first one's running jobs interrupted).  Returns the open file (keep it)."""
    fd = os.open(data_dir / "server.lock", os.O_RDWR | os.O_CREAT, 0o600)
    f = os.fdopen(fd, "r+")
    try:
        import fcntl
    except ImportError:  # Windows: no advisory lock; rely on the port being taken
        return f
    try:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        f.seek(0)
        other = f.read().strip()
        raise SystemExit(f"error: another server is already using {data_dir}" + (f" ({other})" if other else ""))
    f.seek(0)
    f.truncate()
    f.write(f"pid {os.getpid()}\n")
    f.flush()
    return f


def resolve_device(choice: str) -> str:
    if choice == "cpu":
        return "cpu"
    import torch

    if choice == "cuda" and not torch.cuda.is_available():
        raise SystemExit("error: --device cuda but torch sees no CUDA device")
    return "cuda" if torch.cuda.is_available() else "cpu"


def ray_engine(args: argparse.Namespace, local, models_dir: Path):
    """The Ray backend's engine; ``local`` (or the core engine on this machine's CPU) describes the models."""
    from server.ray_backend import BackendUnavailable, RayEngine, WorkerSpec, require_ray

    try:
        require_ray()  # before loading any model: a missing package is one sentence, at once
        if local is None:
            from server.engine import Engine
            local = Engine.from_core(models_dir, "cpu")  # listing only; the workers pick their own device
        spec = WorkerSpec(models_dir=str(models_dir), factory=args.engine, threads=max(1, args.ray_threads),
                          max_sessions=args.live_sessions)
        return RayEngine(local, spec, args.ray_address, workers=args.ray_workers, retries=args.ray_retries)
    except BackendUnavailable as exc:
        raise SystemExit(f"error: {exc}")


async def serve(args: argparse.Namespace) -> None:
    from server import __version__
    from server.app import ENGINE, ServerConfig, create_app
    from server.auth import load_or_create_token
    from server.protocol import Limits
    from core.common import LatentEditError

    from server.net import start_site

    log = logging.getLogger("server")
    os.umask(0o077)  # everything this process writes (SQLite, sessions, thumbnails) is the user's only
    data_dir = (args.data_dir or default_data_dir()).expanduser().resolve()
    if not data_dir.exists():
        data_dir.mkdir(parents=True, mode=0o700)  # it will hold the user's photos and the token
    try:  # whoever created it (install.py, the user): Storage also tightens what is inside
        os.chmod(data_dir, 0o700)
    except OSError as exc:
        raise SystemExit(f"error: cannot make the data folder {data_dir} private: {exc.strerror or exc}")
    lock = lock_data_dir(data_dir)  # noqa: F841  (held until the process exits)
    token_file = (args.token_file or data_dir / "token").expanduser()
    token = load_or_create_token(token_file)
    if args.models_dir is None:
        models_dir = data_dir / "models"
        models_dir.mkdir(parents=True, exist_ok=True)
    else:
        models_dir = args.models_dir.expanduser()
        if not models_dir.is_dir():
            raise SystemExit(f"error: --models-dir {models_dir} is not a folder")
    device = resolve_device(args.device)
    limits = Limits() if args.max_body_mb is None else Limits(max_body_bytes=int(args.max_body_mb * 1024 * 1024))
    config = ServerConfig(data_dir=data_dir, token=token, models_dir=models_dir, device=device, limits=limits,
                          max_queue=args.max_queue, job_timeout_s=args.job_timeout,
                          cache_max_bytes=int(args.cache_mb * 1024 * 1024), live_sessions=args.live_sessions,
                          retention=Retention(max_age_days=args.keep_days, max_jobs=args.keep_jobs),
                          allowed_hosts=(args.host.lower(), f"[{args.host.lower()}]"),
                          max_connections=args.max_connections, header_timeout_s=args.header_timeout)
    engine = None
    if args.engine:
        module, _, factory = args.engine.partition(":")
        engine = getattr(importlib.import_module(module), factory)(config)
    if args.backend == "ray":
        engine = ray_engine(args, engine, models_dir)
    try:
        app = create_app(config, engine=engine)
    except LatentEditError as exc:
        raise SystemExit(f"error: cannot start the engine: {exc}")
    try:
        if not ipaddress.ip_address(args.host).is_loopback:
            log.warning("binding %s: the server is reachable from other machines", args.host)
    except ValueError:
        log.warning("binding host name %s; use 127.0.0.1 to stay local", args.host)
    try:
        site = await start_site(app, args.host, args.port, access_log_class=AccessLogger,
                                max_connections=config.max_connections, header_timeout_s=config.header_timeout_s,
                                keepalive_timeout_s=config.keepalive_timeout_s)
    except OSError as exc:
        raise SystemExit(f"error: cannot listen on {args.host}:{args.port}: {exc.strerror or exc}")
    host, port = site.address
    url_host = f"[{host}]" if ":" in host else host
    log.info("latent-edit %s on %s; data %s; token file %s; models dir %s; models: %s; at most %d connections",
             __version__, device, data_dir, token_file, models_dir, ", ".join(app[ENGINE].model_names()) or "none",
             site.guard.max_connections)
    for name, message in app[ENGINE].model_errors().items():
        log.warning("model %s is not available: %s", name, message)
    if not app[ENGINE].model_names():
        log.warning("no generator available: the embedded default model is missing and %s holds no checkpoint; "
                    "session requests will answer 422 no_models", models_dir)
    print(ready_line(f"http://{url_host}:{port}/"), flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        try:
            loop.add_signal_handler(sig, stop.set)
        except (NotImplementedError, RuntimeError):  # Windows
            signal.signal(sig, lambda *_: loop.call_soon_threadsafe(stop.set))
    await stop.wait()
    log.info("shutting down")
    await site.stop()


def main(argv=None) -> None:
    args = build_parser().parse_args(argv)
    from server.net import EscapingFormatter

    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(EscapingFormatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logging.basicConfig(level=getattr(logging, args.log_level.upper()), handlers=[handler])
    asyncio.run(serve(args))


if __name__ == "__main__":
    main()
