"""Templates: a Debian root filesystem plus a warm-up, built once into the state dir.

A template is declared in a small TOML file (see templates/*.toml beside this
module): Debian packages, pip packages, warm-up code, and optionally a parent to
extend. ``TemplateStore.build()`` turns it into ``templates/<name>``, a symlink
to an immutable build directory. A build is made aside and swapped in with an
atomic rename, so a failed or interrupted build leaves the previous good one in
place, and a build whose definition has not changed is a no-op.

The guest agent is not baked into the root filesystem: the backends mount the
host's copy read-only at start, so changing forkd's code never forces a rebuild.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
import subprocess
import time
import tomllib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from forkd.protocol import ErrorCode, RpcError

from ._state import state_dir

__all__ = ["TemplateSpec", "Template", "TemplateStore", "TemplateError", "BUILTIN_DIR", "load_spec"]

BUILTIN_DIR = Path(__file__).with_name("templates")
# Bump when the build steps change in a way that should rebuild every template.
RECIPE_VERSION = 5
DEFAULT_MIRROR = "http://deb.debian.org/debian"
# Mount points the backends need inside every template.
MOUNT_POINTS = ("opt/forkd/run", "opt/forkd/lib", "opt/forkd/lower")

Progress = Callable[[str], None]


class TemplateError(RpcError):
    def __init__(self, message: str) -> None:
        super().__init__(ErrorCode.TEMPLATE, message)


@dataclass(frozen=True)
class TemplateSpec:
    name: str
    packages: tuple[str, ...] = ()
    pip: tuple[str, ...] = ()
    warmup: str = ""
    suite: str = "bookworm"
    mirror: str = DEFAULT_MIRROR
    env: dict = field(default_factory=dict)

    def canonical(self) -> dict:
        return {
            "name": self.name,
            "packages": sorted(set(self.packages)),
            "pip": list(self.pip),
            "warmup": self.warmup,
            "suite": self.suite,
            "mirror": self.mirror,
            "env": dict(sorted(self.env.items())),
            "recipe": RECIPE_VERSION,
        }

    @property
    def digest(self) -> str:
        blob = json.dumps(self.canonical(), sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()


def _valid_name(name: str) -> bool:
    return (
        bool(name) and len(name) <= 64 and all(c.isalnum() or c in "-_." for c in name) and name[0].isalnum()
    )


KEYS = {"name", "extends", "packages", "pip", "warmup", "suite", "mirror", "env"}


def load_spec(name_or_path: str, search: tuple[Path, ...] = (BUILTIN_DIR,)) -> TemplateSpec:
    """Load a definition by template name (from ``search``) or by file path."""
    return _load_spec(name_or_path, tuple(search), ())


def _load_spec(name_or_path: str, search: tuple[Path, ...], chain: tuple[Path, ...]) -> TemplateSpec:
    path = Path(name_or_path)
    if path.suffix != ".toml":
        if not _valid_name(name_or_path):
            raise TemplateError(f"invalid template name {name_or_path!r}")
        for d in search:
            candidate = Path(d) / f"{name_or_path}.toml"
            if candidate.is_file():
                path = candidate
                break
        else:
            raise TemplateError(
                f"no template named {name_or_path!r} (looked in {', '.join(map(str, search))})"
            )
    if path.resolve() in chain:
        cycle = " -> ".join(str(p) for p in (*chain, path.resolve()))
        raise TemplateError(f"template definitions extend each other in a cycle: {cycle}")
    chain = (*chain, path.resolve())
    try:
        raw = tomllib.loads(path.read_text())
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise TemplateError(f"cannot read template definition {path}: {exc}") from None
    unknown = set(raw) - KEYS
    if unknown:
        raise TemplateError(
            f"unknown keys in {path}: {', '.join(sorted(unknown))} (allowed: {', '.join(sorted(KEYS))})"
        )
    for key in ("name", "extends", "warmup", "suite", "mirror"):
        if key in raw and not isinstance(raw[key], str):
            raise TemplateError(f"'{key}' in {path} must be a string, not {type(raw[key]).__name__}")
    for key in ("packages", "pip"):
        value = raw.get(key, [])
        if not isinstance(value, list) or not all(isinstance(v, str) and v.strip() for v in value):
            raise TemplateError(f"'{key}' in {path} must be a list of non-empty strings")
    env = raw.get("env", {})
    if not isinstance(env, dict) or not all(isinstance(v, str) for v in env.values()):
        raise TemplateError(f"'env' in {path} must be a table of strings")
    name = raw.get("name") or path.stem
    if not _valid_name(name):
        raise TemplateError(f"invalid template name {name!r} in {path}")
    base = TemplateSpec(name=name)
    if raw.get("extends"):
        parent = _load_spec(raw["extends"], (path.parent, *search), chain)
        base = TemplateSpec(
            name=name,
            packages=parent.packages,
            pip=parent.pip,
            warmup=parent.warmup,
            suite=parent.suite,
            mirror=parent.mirror,
            env=dict(parent.env),
        )
    return TemplateSpec(
        name=name,
        packages=tuple(dict.fromkeys((*base.packages, *raw.get("packages", [])))),
        pip=tuple(dict.fromkeys((*base.pip, *raw.get("pip", [])))),
        # A child's warm-up runs after its parent's (both in the same interpreter).
        warmup="\n".join(w for w in (base.warmup, raw.get("warmup", "")) if w.strip()),
        suite=raw.get("suite", base.suite),
        mirror=raw.get("mirror", base.mirror),
        env={**base.env, **env},
    )


@dataclass(frozen=True)
class Template:
    name: str
    path: Path  # the build directory
    spec: TemplateSpec
    built_at: float
    # The digest the build was made for. Not recomputed from ``spec``: that would apply
    # today's RECIPE_VERSION to a build made with an older recipe and call it current.
    digest: str

    @property
    def rootfs(self) -> Path:
        return self.path / "rootfs"

    def versions(self) -> str:
        return (self.path / "versions.txt").read_text()


class TemplateStore:
    def __init__(self, root: str | os.PathLike | None = None) -> None:
        self.root = state_dir(root) / "templates"
        self.builds = self.root / "builds"
        self.builds.mkdir(parents=True, exist_ok=True)

    def get(self, name: str) -> Template:
        if not _valid_name(name):
            raise TemplateError(f"invalid template name {name!r}")
        link = self.root / name
        try:
            path = link.resolve(strict=True)
            meta = json.loads((path / "build.json").read_text())
        except (OSError, ValueError):
            raise TemplateError(
                f"template {name!r} is not built (run: forkd template build {name})"
            ) from None
        try:
            spec = TemplateSpec(
                **{k: (tuple(v) if isinstance(v, list) else v) for k, v in meta["spec"].items()}
            )
            return Template(name=name, path=path, spec=spec, built_at=meta["built_at"], digest=meta["digest"])
        except (KeyError, TypeError) as exc:
            raise TemplateError(f"template {name!r} has a damaged build.json in {path}: {exc}") from None

    def list(self) -> list[Template]:
        out = []
        for entry in sorted(self.root.iterdir()):
            if entry.is_symlink():
                try:
                    out.append(self.get(entry.name))
                except TemplateError:
                    pass
        return out

    def is_current(self, spec: TemplateSpec) -> bool:
        try:
            return self.get(spec.name).digest == spec.digest
        except TemplateError:
            return False

    def build(self, spec: TemplateSpec, progress: Progress = print, force: bool = False) -> Template:
        if not force and self.is_current(spec):
            progress(f"template {spec.name} is up to date ({spec.digest[:12]})")
            return self.get(spec.name)
        if os.geteuid() != 0:
            raise TemplateError("building a template needs root (mmdebstrap creates device nodes and owners)")
        if shutil.which("mmdebstrap") is None:
            raise TemplateError("mmdebstrap is not installed (apt-get install mmdebstrap)")
        # One builder per name at a time (test runs and CLI calls share stores); whoever waited
        # usually finds the template built by the other.
        with open(self.root / f".{spec.name}.lock", "w") as lock:
            if not _try_lock(lock):
                progress(f"waiting for another build of {spec.name} to finish")
                fcntl.flock(lock, fcntl.LOCK_EX)
            if not force and self.is_current(spec):
                progress(f"template {spec.name} is up to date ({spec.digest[:12]})")
                return self.get(spec.name)
            self._remove_abandoned(spec.name)
            return self._build_locked(spec, progress)

    def _remove_abandoned(self, name: str) -> None:
        """Work directories of builds whose process died (killed, machine crash): nothing else removes them."""
        for entry in self.builds.iterdir():
            base, sep, pid = entry.name.rpartition(".tmp-")
            if sep and _build_name(base) == name and pid.isdigit() and not _pid_alive(int(pid)):
                shutil.rmtree(entry, ignore_errors=True)
        for entry in self.root.glob(f".{name}.link-*"):
            pid = entry.name.rpartition("-")[2]
            if pid.isdigit() and not _pid_alive(int(pid)):
                entry.unlink(missing_ok=True)

    def _build_locked(self, spec: TemplateSpec, progress: Progress) -> Template:
        # time_ns: two builds of one digest (--force) in the same second must not collide.
        final = self.builds / f"{spec.name}-{spec.digest[:12]}-{time.time_ns()}"
        work = final.with_name(final.name + f".tmp-{os.getpid()}")
        work.mkdir(parents=True)
        try:
            self._debootstrap(spec, work / "rootfs", progress)
            progress("recording package versions")
            versions = _package_versions(work / "rootfs", bool(spec.pip))
            (work / "versions.txt").write_text(versions)
            canonical = spec.canonical()
            meta = {
                "spec": {
                    k: canonical[k] for k in ("name", "packages", "pip", "warmup", "suite", "mirror", "env")
                },
                "digest": spec.digest,
                "built_at": time.time(),
            }
            (work / "build.json").write_text(json.dumps(meta, indent=2))
            os.rename(work, final)
        except BaseException:
            shutil.rmtree(work, ignore_errors=True)
            raise
        # Swap the name to the new build atomically: readers see old or new, never neither.
        link = self.root / spec.name
        tmp_link = self.root / f".{spec.name}.link-{os.getpid()}"
        previous = link.resolve() if link.is_symlink() else None
        os.symlink(os.path.relpath(final, self.root), tmp_link)
        os.replace(tmp_link, link)
        self._prune(spec.name, keep={final, previous})
        progress(f"template {spec.name} built ({spec.digest[:12]}) in {final}")
        return self.get(spec.name)

    def _prune(self, name: str, keep: set) -> None:
        """Drop old builds of this template, but keep the previous one: running
        sandboxes may still use it as their lower layer."""
        for entry in self.builds.iterdir():
            # By parsed name, not prefix: pruning "base" must not touch "base-gpu".
            if _build_name(entry.name) == name and entry not in keep and ".tmp-" not in entry.name:
                shutil.rmtree(entry, ignore_errors=True)

    def _debootstrap(self, spec: TemplateSpec, rootfs: Path, progress: Progress) -> None:
        packages = list(spec.packages)
        if spec.pip and "python3-pip" not in packages:
            packages.append("python3-pip")
        hooks = [
            'chroot "$1" useradd --create-home --uid 1000 --user-group --shell /bin/bash user',
            # sudo is not in minbase: a template that does not ask for it has no sudoers.d.
            'if [ -d "$1/etc/sudoers.d" ]; then'
            " echo 'user ALL=(ALL) NOPASSWD:ALL' > \"$1/etc/sudoers.d/user\""
            ' && chmod 0440 "$1/etc/sudoers.d/user"; fi',
            *(f'mkdir -p "$1/{d}"' for d in MOUNT_POINTS),
            f'echo "{spec.name} {spec.digest}" > "$1/etc/forkd-template"',
            # Every sandbox has its own hostname (UTS namespace): let /etc/hostname
            # follow it instead of carrying the build host's name; libnss-myhostname
            # makes it resolve without per-sandbox writes to /etc/hosts.
            'ln -sf /proc/sys/kernel/hostname "$1/etc/hostname"',
            "printf '127.0.0.1\\tlocalhost\\n::1\\tlocalhost ip6-localhost ip6-loopback\\n' > \"$1/etc/hosts\"",
            # Every command runs as `bash -l -c`: keep login scripts from forking (a
            # fork+exec costs milliseconds). bash knows its EUID; `mesg` only matters
            # on a terminal.
            'sed -i \'s/"$(id -u)"/"${EUID:-$(id -u)}"/g\' "$1/etc/profile"',
            'if [ -f "$1/root/.profile" ]; then sed -i \'s/^mesg n/[ -t 0 ] \\&\\& mesg n/\' "$1/root/.profile"; fi',
        ]
        if spec.pip:
            pkgs = " ".join(_shell_quote(p) for p in spec.pip)
            hooks.append(
                f'chroot "$1" python3 -m pip install --no-cache-dir --break-system-packages --root-user-action=ignore {pkgs}'
            )
        hooks.append('rm -rf "$1"/var/lib/apt/lists/* "$1"/var/cache/apt/*.bin')
        cmd = [
            "mmdebstrap",
            "--mode=root",
            "--variant=minbase",
            *([f"--include={','.join(packages)}"] if packages else []),
            *(f"--customize-hook={h}" for h in hooks),
            spec.suite,
            str(rootfs),
            spec.mirror,
        ]
        progress(f"building template {spec.name}: mmdebstrap {spec.suite} with {len(packages)} packages")
        for attempt in (1, 2):
            proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
            tail: list[str] = []
            assert proc.stdout is not None
            for line in proc.stdout:
                line = line.rstrip()
                tail = (tail + [line])[-30:]
                if line.startswith(("I:", "E:", "W:")):
                    progress(f"  {line}")
            if proc.wait() == 0:
                return
            # A mirror hiccup is worth one more try; a bad definition is not.
            if attempt == 1 and any(m in line for line in tail for m in _TRANSIENT):
                progress("  download failed: trying once more")
                shutil.rmtree(rootfs, ignore_errors=True)
                continue
            raise TemplateError(f"mmdebstrap failed ({proc.returncode}):\n" + "\n".join(tail))


# Output of apt/mmdebstrap that means the network, not the definition, failed.
_TRANSIENT = ("Failed to fetch", "Temporary failure", "Could not resolve", "Connection failed", "Unable to fetch",
              "Hash Sum mismatch", "Connection timed out")  # fmt: skip


def _package_versions(rootfs: Path, with_pip: bool) -> str:
    query = ["dpkg-query", f"--admindir={rootfs}/var/lib/dpkg", "-W", "-f=${Package}=${Version}\n"]
    try:
        out = subprocess.run(query, capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError) as exc:
        detail = getattr(exc, "stderr", "") or exc
        raise TemplateError(f"cannot list the packages of the new root filesystem: {detail}") from None
    lines = sorted(out.splitlines())
    if with_pip:
        pip = subprocess.run(
            ["chroot", str(rootfs), "python3", "-m", "pip", "list", "--format=freeze"],
            capture_output=True,
            text=True,
        )
        lines += ["", "# pip"] + sorted(pip.stdout.splitlines())
    return "\n".join(lines) + "\n"


def _build_name(entry: str) -> str:
    """The template name of a build directory ``<name>-<digest12>-<stamp>``."""
    parts = entry.split(".tmp-")[0].rsplit("-", 2)
    return parts[0] if len(parts) == 3 else ""


def _try_lock(f) -> bool:
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except BlockingIOError:
        return False


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    return True


def _shell_quote(s: str) -> str:
    import shlex

    return shlex.quote(s)
