"""The ``forkd`` command: ``serve``, ``doctor``, ``template build NAME``, ``template list``."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path


def _template_build(args: argparse.Namespace) -> int:
    from forkd_runtime import TemplateError, TemplateStore, load_spec

    def progress(m: str) -> None:
        print(m, flush=True)

    try:
        spec = load_spec(args.name)
        store = TemplateStore(args.state_dir)
        template = store.build(spec, progress=progress, force=args.force)
        if args.backend in ("vm", "all"):
            # The microVM backend's image of it: kernel, initramfs, disk images (cached).
            from forkd_runtime.vm._image import build_image

            image = build_image(template, store.root / "vm", progress)
            progress(f"vm image of {template.name} ready: {image}")
    except TemplateError as exc:
        print(f"forkd: {exc.message}", file=sys.stderr)
        return 1
    return 0


def _template_list(args: argparse.Namespace) -> int:
    from forkd_runtime import TemplateStore

    for t in TemplateStore(args.state_dir).list():
        print(f"{t.name}\t{t.digest[:12]}\t{t.path}")
    return 0


def serve_config(args: argparse.Namespace):
    """The gateway configuration ``forkd serve`` runs with: file, then environment, then options."""
    from ._auth import AuthConfigError, check_bind
    from ._config import ConfigError, load_config, parse_pool_option

    try:
        cfg = load_config(args.config)
        for name in ("host", "port", "backend", "default_timeout", "heartbeat", "log_level", "audit_log"):
            value = getattr(args, name, None)
            if value is not None:
                setattr(cfg, name, value)
        for name in ("state_dir", "templates_dir"):
            value = getattr(args, name, None)
            if value is not None:
                setattr(cfg, name, Path(value))
        if args.api_keys_file:
            cfg.keys.add_file(args.api_keys_file)
        for option in args.pool or []:
            name, pool = parse_pool_option(option)
            cfg.pools[name] = pool
        if args.no_wait:
            cfg.wait_for_pools = False
        cfg.validate()
        check_bind(cfg.host, cfg.keys)
    except (ConfigError, AuthConfigError) as exc:
        raise SystemExit(f"forkd serve: {exc}") from None
    return cfg


def build_pool_templates(cfg) -> None:
    """Build (once; a no-op when current) the templates the configured pools need,
    so a fresh host goes from nothing to serving with one command."""
    from forkd_runtime import TemplateError, TemplateStore, load_spec

    store = TemplateStore(cfg.resolved_templates_dir())
    for name in cfg.pools:
        try:
            spec = load_spec(name)
        except TemplateError:
            continue  # not a built-in definition: the gateway reports it if it is not built
        try:
            store.build(spec, progress=lambda m: print(f"forkd serve: {m}", flush=True))
        except TemplateError as exc:
            raise SystemExit(f"forkd serve: cannot build template {name}: {exc.message}") from None


def _serve(args: argparse.Namespace) -> int:
    import uvicorn

    from ._app import create_app, uvicorn_config
    from ._gateway import Gateway

    cfg = serve_config(args)
    level = cfg.log_level.upper()
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if not args.no_build:
        build_pool_templates(cfg)
    gateway = Gateway(cfg)
    server = uvicorn.Server(uvicorn_config(create_app(gateway), cfg.host, cfg.port, log_level=cfg.log_level))
    server.run()
    # uvicorn swallows a failed lifespan start-up (a missing template, a busy state directory): say so.
    return 0 if gateway.state == "closed" and server.started else 1


def _doctor(_args: argparse.Namespace) -> int:
    import asyncio
    import inspect

    try:
        from forkd_runtime import _doctor
    except ImportError:
        print(json.dumps({"note": "forkd_runtime._doctor is not available in this build"}, indent=2))
        return 0
    report = _doctor.report()
    if inspect.isawaitable(report):
        report = asyncio.run(report)
    print(json.dumps(report, indent=2, default=str))
    return 0


def _add_serve(sub) -> None:
    s = sub.add_parser("serve", help="run the gateway (websocket API, health, metrics)")
    s.add_argument("--host", default=None, help="address to listen on (default 127.0.0.1)")
    s.add_argument("--port", type=int, default=None, help="port (default 49982)")
    s.add_argument("--config", default=None, help="TOML configuration file")
    s.add_argument("--api-keys-file", default=None, help="API keys, one per line (optionally name:key)")
    s.add_argument(
        "--backend", choices=("auto", "process", "vm"), default=None, help="fork engine (default auto)"
    )
    s.add_argument(
        "--pool",
        action="append",
        metavar="NAME=MIN[:MAX]",
        help="warm pool of a template: MIN children kept ready, MAX at most (repeatable; default base=4)",
    )
    # SUPPRESS: the top-level --state-dir must not be overwritten by this option's default.
    s.add_argument("--state-dir", default=argparse.SUPPRESS, help="state directory (default /var/lib/forkd)")
    s.add_argument("--templates-dir", default=None, help="where templates were built (default: state dir)")
    s.add_argument(
        "--default-timeout", type=float, default=None, help="sandbox lease in seconds (default 300)"
    )
    s.add_argument(
        "--audit-log", default=None, help="JSON-lines audit log ('' disables; default STATE/audit.log)"
    )
    s.add_argument(
        "--heartbeat", type=float, default=None, help="ping clients idle this long, seconds (0: never)"
    )
    s.add_argument("--no-wait", action="store_true", help="start listening before the pools are filled")
    s.add_argument(
        "--no-build",
        action="store_true",
        help="do not build missing templates of the configured pools at start",
    )
    s.add_argument("--log-level", default=None, choices=("debug", "info", "warning", "error"))
    s.set_defaults(func=_serve)


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="forkd", description="forkd sandbox runtime")
    ap.add_argument(
        "--state-dir", default=None, help="state directory (default $FORKD_STATE_DIR or /var/lib/forkd)"
    )
    sub = ap.add_subparsers(dest="command", required=True)
    _add_serve(sub)
    d = sub.add_parser("doctor", help="report what this host supports (KVM, namespaces, cgroups...) as JSON")
    d.set_defaults(func=_doctor)
    tpl = sub.add_parser("template", help="build and list templates")
    tsub = tpl.add_subparsers(dest="template_command", required=True)
    b = tsub.add_parser("build", help="build a template (no-op when up to date)")
    b.add_argument("name", help="template name (base, code-interpreter) or a .toml definition file")
    b.add_argument("--force", action="store_true", help="rebuild even when up to date")
    b.add_argument(
        "--backend",
        choices=["process", "vm", "all"],
        default="process",
        help="also build the microVM image (kernel, initramfs, disks) with vm or all",
    )
    b.set_defaults(func=_template_build)
    ls = tsub.add_parser("list", help="list built templates")
    ls.set_defaults(func=_template_list)
    return ap


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
