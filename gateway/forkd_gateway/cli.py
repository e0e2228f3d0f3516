"""The ``forkd`` command: ``forkd template build NAME``, ``forkd template list``."""

from __future__ import annotations

import argparse
import sys


def _template_build(args: argparse.Namespace) -> int:
    from forkd_runtime import TemplateError, TemplateStore, load_spec

    try:
        spec = load_spec(args.name)
        TemplateStore(args.state_dir).build(spec, progress=lambda m: print(m, flush=True), force=args.force)
    except TemplateError as exc:
        print(f"forkd: {exc.message}", file=sys.stderr)
        return 1
    return 0


def _template_list(args: argparse.Namespace) -> int:
    from forkd_runtime import TemplateStore

    for t in TemplateStore(args.state_dir).list():
        print(f"{t.name}\t{t.digest[:12]}\t{t.path}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="forkd", description="forkd sandbox runtime")
    ap.add_argument(
        "--state-dir", default=None, help="state directory (default $FORKD_STATE_DIR or /var/lib/forkd)"
    )
    sub = ap.add_subparsers(dest="command", required=True)
    tpl = sub.add_parser("template", help="build and list templates")
    tsub = tpl.add_subparsers(dest="template_command", required=True)
    b = tsub.add_parser("build", help="build a template (no-op when up to date)")
    b.add_argument("name", help="template name (base, code-interpreter) or a .toml definition file")
    b.add_argument("--force", action="store_true", help="rebuild even when up to date")
    b.set_defaults(func=_template_build)
    ls = tsub.add_parser("list", help="list built templates")
    ls.set_defaults(func=_template_list)
    return ap


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
