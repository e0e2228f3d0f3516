"""Template definitions, the build store and the `forkd template` CLI.

Builds with new definitions use a stand-in `mmdebstrap` put first on PATH (a boundary we do not own: it
prints mmdebstrap-like lines and makes a tiny root filesystem with a dpkg status file, or fails with an
`E:` line); the real mmdebstrap is exercised by the session's `base` build, and by
test_real_minimal_build_and_broken_rebuild when FORKD_TEST_REAL_BUILDS=1 (about a minute).
"""

import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from conftest import TEMPLATES_DIR

from forkd.protocol import ErrorCode
from forkd_runtime import TemplateError, TemplateStore, load_spec
from forkd_runtime import _templates as templates_mod

ROOT = Path(__file__).resolve().parent.parent
FORKD = [sys.executable, "-m", "forkd_gateway.cli"]

FAKE_MMDEBSTRAP = r"""#!/bin/sh
# Stand-in for mmdebstrap: ... SUITE TARGET MIRROR are the last three arguments.
for a; do prev2=$prev1; prev1=$last; last=$a; done
target=$prev1
echo "$target" >> "$FAKE_LOG"  # one line per run
echo "I: chroot architecture amd64 is equal to the host's architecture"
echo "noise that is not a progress line"
if [ -n "$FAKE_GATE" ]; then
    echo "I: waiting for the gate"
    while [ ! -e "$FAKE_GATE" ]; do sleep 0.02; done
fi
mkdir -p "$target/var/lib/dpkg" "$target/etc"
case "$*" in *flaky-mirror*)
    if [ ! -e "$FAKE_LOG.flaked" ]; then
        touch "$FAKE_LOG.flaked" "$target/partial"
        echo "E: Failed to fetch http://deb.debian.org/debian/pool/main/x.deb  Temporary failure resolving"
        exit 1
    fi;;
esac
case "$*" in *no-such-package*)
    echo "E: Unable to locate package no-such-package"
    echo "E: mmdebstrap failed to run"
    exit 1;;
esac
for p in $( (echo python3-minimal; echo "$*" | sed -n 's/.*--include=\([^ ]*\).*/\1/p' | tr , '\n') | sort -u); do
    printf 'Package: %s\nStatus: install ok installed\nMaintainer: x\nVersion: 1.0-%s\nArchitecture: amd64\nDescription: x\n\n' "$p" "$p" >> "$target/var/lib/dpkg/status"
done
echo "I: success in 0.1 seconds"
"""


def _write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


@pytest.fixture
def fake_build(tmp_path, monkeypatch):
    """A private store, definitions dir, and the stand-in mmdebstrap first on PATH."""
    if os.geteuid() != 0:
        pytest.skip("building needs root")
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    fake = bin_dir / "mmdebstrap"
    fake.write_text(FAKE_MMDEBSTRAP)
    fake.chmod(0o755)
    log = tmp_path / "mmdebstrap.log"
    monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")
    monkeypatch.setenv("FAKE_LOG", str(log))
    defs = tmp_path / "defs"
    defs.mkdir()

    class Env:
        state = tmp_path / "state"
        store = TemplateStore(tmp_path / "state")
        calls = log

        @staticmethod
        def spec(name: str, packages=("python3-minimal",), warmup="") -> Path:
            body = f"name = {name!r}\npackages = {json.dumps(list(packages))}\nwarmup = {warmup!r}\n"
            return _write(defs / f"{name}.toml", body)

        def leftovers(self) -> list[str]:
            root = self.store.root
            return [
                p.name
                for p in (*root.iterdir(), *root.joinpath("builds").iterdir())
                if ".tmp-" in p.name or ".link-" in p.name
            ]

    return Env()


def _cli(*args: str, state: Path, **kw) -> subprocess.CompletedProcess:
    return subprocess.run(
        [*FORKD, "--state-dir", str(state), *args], capture_output=True, text=True, timeout=120, **kw
    )


# -- definitions ---------------------------------------------------------------------------------
def test_load_base_and_code_interpreter():
    base = load_spec("base")
    assert base.name == "base"
    assert {"python3", "python3-msgpack", "python3-numpy", "sudo", "bash"} <= set(base.packages)
    assert base.warmup == "import numpy" and base.suite == "bookworm"

    ci = load_spec("code-interpreter")
    assert ci.name == "code-interpreter"
    # extends: the parent's packages first, then its own; warm-ups run parent first.
    assert ci.packages == (*base.packages, "python3-matplotlib", "python3-pandas")
    assert ci.warmup.startswith("import numpy\n") and "import matplotlib.pyplot" in ci.warmup
    assert ci.warmup.index("import numpy\n") < ci.warmup.index("import numpy, pandas")
    assert ci.suite == base.suite and ci.mirror == base.mirror
    assert ci.digest != base.digest


@pytest.mark.parametrize("name", ["", "../etc/passwd", "bad name", "-dash", "a" * 65, "x/y"])
def test_invalid_names_are_refused(name):
    with pytest.raises(TemplateError) as err:
        load_spec(name)
    assert err.value.code is ErrorCode.TEMPLATE
    assert "invalid template name" in err.value.message or "no template named" in err.value.message


def test_unknown_template_name():
    with pytest.raises(TemplateError, match="no template named 'nope'"):
        load_spec("nope")


@pytest.mark.parametrize(
    "body, message",
    [
        ('packages = ["a"]\nimage = "x"\n', "unknown keys in .*: image"),
        ('packages = "python3"\n', "'packages' in .* must be a list"),
        ("packages = [1, 2]\n", "'packages' in .* must be a list"),
        ('pip = [""]\n', "'pip' in .* must be a list of non-empty strings"),
        ("warmup = 5\n", "'warmup' in .* must be a string, not int"),
        ("name = 5\n", "'name' in .* must be a string"),
        ("suite = [1]\n", "'suite' in .* must be a string"),
        ("extends = true\n", "'extends' in .* must be a string"),
        ('env = ["A=1"]\n', "'env' in .* must be a table of strings"),
        ("env = { A = 1 }\n", "'env' in .* must be a table of strings"),
        ('name = "no spaces allowed"\n', "invalid template name 'no spaces allowed'"),
        ('extends = "does-not-exist"\n', "no template named 'does-not-exist'"),
        ("packages = [\n", "cannot read template definition"),
    ],
)
def test_bad_definitions_raise_clear_errors(tmp_path, body, message):
    path = _write(tmp_path / "t.toml", body)
    with pytest.raises(TemplateError, match=message) as err:
        load_spec(str(path))
    assert err.value.code is ErrorCode.TEMPLATE


def test_extends_cycle_is_an_error(tmp_path):
    _write(tmp_path / "a.toml", 'extends = "b"\n')
    _write(tmp_path / "b.toml", 'extends = "a"\n')
    with pytest.raises(TemplateError, match="cycle"):
        load_spec(str(tmp_path / "a.toml"))


def test_extends_finds_parent_beside_the_file_and_builtin(tmp_path):
    _write(
        tmp_path / "mine.toml",
        'extends = "code-interpreter"\npackages = ["git", "python3-numpy"]\nenv = { A = "1" }\n',
    )
    spec = load_spec(str(tmp_path / "mine.toml"))
    assert spec.name == "mine"
    assert spec.packages[-1] == "git" and spec.packages.count("python3-numpy") == 1
    assert spec.env == {"A": "1"}


def test_digest_follows_the_definition(tmp_path):
    def digest(body: str) -> str:
        return load_spec(str(_write(tmp_path / "d.toml", body))).digest

    d0 = digest('packages = ["a", "b"]\nwarmup = "import os"\n')
    assert digest('packages = ["b", "a", "a"]\nwarmup = "import os"\n') == d0  # a set of packages
    assert digest('packages = ["a", "b", "c"]\nwarmup = "import os"\n') != d0
    assert digest('packages = ["a", "b"]\nwarmup = "import sys"\n') != d0
    assert digest('packages = ["a", "b"]\nwarmup = "import os"\nsuite = "trixie"\n') != d0
    assert digest('packages = ["a", "b"]\nwarmup = "import os"\npip = ["x"]\n') != d0


# -- the shared, really built `base` ---------------------------------------------------------------
def test_build_of_up_to_date_template_is_a_noop(template_store):
    before = template_store.get("base")
    messages: list[str] = []
    t0 = time.monotonic()
    tpl = template_store.build(load_spec("base"), progress=messages.append)
    assert time.monotonic() - t0 < 5  # no mmdebstrap run: a real build takes ~25 s or more
    assert tpl.path == before.path
    assert messages == [f"template base is up to date ({tpl.digest[:12]})"]

    out = _cli("template", "build", "base", state=TEMPLATES_DIR)
    assert out.returncode == 0, out.stderr
    assert "template base is up to date" in out.stdout
    assert template_store.get("base").path == before.path


def test_versions_txt_records_package_versions(template_store):
    versions = dict(
        line.split("=", 1) for line in template_store.get("base").versions().splitlines() if "=" in line
    )
    for pkg in ("python3-numpy", "python3-msgpack", "bash", "sudo", "ca-certificates"):
        assert versions.get(pkg), f"{pkg} missing from versions.txt"
    assert versions["python3-numpy"][0].isdigit()


def test_template_list_shows_built_templates(template_store):
    out = _cli("template", "list", state=TEMPLATES_DIR)
    assert out.returncode == 0, out.stderr
    rows = {line.split("\t")[0]: line.split("\t") for line in out.stdout.splitlines()}
    base = template_store.get("base")
    assert rows["base"][1] == base.digest[:12] and rows["base"][2] == str(base.path)


def test_cli_reports_definition_errors(tmp_path):
    out = _cli("template", "build", "nope", state=tmp_path / "state")
    assert out.returncode == 1
    assert out.stderr.startswith("forkd: no template named 'nope'")
    bad = _write(tmp_path / "bad.toml", "warmup = 5\n")
    out = _cli("template", "build", str(bad), state=tmp_path / "state")
    assert out.returncode == 1 and "'warmup'" in out.stderr and "Traceback" not in out.stderr


# -- builds (stand-in mmdebstrap) ---------------------------------------------------------------------
def test_build_records_versions_and_swaps_in_atomically(fake_build):
    messages: list[str] = []
    spec = load_spec(str(fake_build.spec("tiny", packages=["python3-minimal", "bash"])))
    tpl = fake_build.store.build(spec, progress=messages.append)
    assert tpl.digest == spec.digest and tpl.rootfs.is_dir()
    assert (fake_build.store.root / "tiny").is_symlink()
    assert "bash=1.0-bash" in tpl.versions().splitlines()
    # Progress: mmdebstrap's I:/E:/W: lines, not its noise.
    assert messages[0].startswith("building template tiny: mmdebstrap bookworm with 2 packages")
    assert "  I: success in 0.1 seconds" in messages and not any("noise" in m for m in messages)
    assert messages[-1].startswith("template tiny built")
    assert fake_build.leftovers() == []
    assert [t.name for t in fake_build.store.list()] == ["tiny"]

    # up to date: no second mmdebstrap run
    calls = fake_build.calls.read_text().count("\n")
    again = fake_build.store.build(spec, progress=messages.append)
    assert again.path == tpl.path and fake_build.calls.read_text().count("\n") == calls


def test_broken_rebuild_keeps_the_previous_good_build(fake_build):
    good = fake_build.store.build(load_spec(str(fake_build.spec("tiny"))), progress=lambda m: None)
    broken = load_spec(str(fake_build.spec("tiny", packages=["python3-minimal", "no-such-package"])))
    assert broken.digest != good.digest
    messages: list[str] = []
    with pytest.raises(TemplateError) as err:
        fake_build.store.build(broken, progress=messages.append)
    assert "mmdebstrap failed (1)" in err.value.message
    assert "E: Unable to locate package no-such-package" in err.value.message
    assert "  E: Unable to locate package no-such-package" in messages  # streamed as it happened

    now = fake_build.store.get("tiny")
    assert (now.path, now.digest) == (good.path, good.digest)
    assert (good.path / "versions.txt").is_file() and good.rootfs.is_dir()
    assert fake_build.leftovers() == []
    assert sorted(p.name for p in fake_build.store.builds.iterdir()) == [good.path.name]
    assert not fake_build.store.is_current(broken)


def test_cli_build_streams_progress_and_fails_cleanly(fake_build, tmp_path):
    definition = fake_build.spec("streamed")
    gate = tmp_path / "gate"
    env = {**os.environ, "FAKE_GATE": str(gate), "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(
        [*FORKD, "--state-dir", str(fake_build.state), "template", "build", str(definition)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    try:
        lines = []
        while "waiting for the gate" not in "".join(lines):
            line = proc.stdout.readline()
            assert line, f"CLI ended before the gate: {lines} {proc.stderr.read()}"
            lines.append(line)
        # Lines arrive while mmdebstrap is still running (blocked on the gate), not at the end.
        assert proc.poll() is None
        assert lines[0].startswith("building template streamed:")
        assert "  I: chroot architecture amd64 is equal to the host's architecture\n" in lines
        gate.touch()
        rest, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, err
    assert "recording package versions" in rest and "template streamed built" in rest

    broken = fake_build.spec("streamed", packages=["no-such-package"])
    out = _cli("template", "build", str(broken), state=fake_build.state, env={**os.environ, "FAKE_GATE": ""})
    assert out.returncode == 1
    assert "  E: Unable to locate package no-such-package" in out.stdout
    assert out.stderr.startswith("forkd: mmdebstrap failed (1)") and "Traceback" not in out.stderr
    listed = _cli("template", "list", state=fake_build.state)
    assert listed.stdout.startswith("streamed\t" + load_spec(str(fake_build.spec("streamed"))).digest[:12])


def test_forced_rebuild_keeps_the_previous_build_and_prunes_older(fake_build):
    spec = load_spec(str(fake_build.spec("tiny")))
    first = fake_build.store.build(spec, progress=lambda m: None)
    second = fake_build.store.build(spec, progress=lambda m: None, force=True)
    assert second.path != first.path  # even within the same second
    third = fake_build.store.build(spec, progress=lambda m: None, force=True)
    names = sorted(p.name for p in fake_build.store.builds.iterdir())
    assert names == sorted([second.path.name, third.path.name])  # previous kept for running sandboxes
    assert fake_build.store.get("tiny").path == third.path


def test_pruning_one_template_spares_another_with_a_longer_name(fake_build):
    other = fake_build.store.build(load_spec(str(fake_build.spec("tiny-extra"))), progress=lambda m: None)
    spec = load_spec(str(fake_build.spec("tiny")))
    for _ in range(3):
        fake_build.store.build(spec, progress=lambda m: None, force=True)
    assert fake_build.store.get("tiny-extra").path == other.path
    assert other.rootfs.is_dir()


def test_recipe_change_makes_builds_stale(fake_build, monkeypatch):
    spec = load_spec(str(fake_build.spec("tiny")))
    fake_build.store.build(spec, progress=lambda m: None)
    assert fake_build.store.is_current(spec)
    monkeypatch.setattr(templates_mod, "RECIPE_VERSION", templates_mod.RECIPE_VERSION + 1)
    assert not fake_build.store.is_current(load_spec(str(fake_build.spec("tiny"))))


def test_abandoned_work_dirs_are_removed_by_the_next_build(fake_build):
    dead = subprocess.Popen(["true"])
    dead.wait()
    spec = load_spec(str(fake_build.spec("tiny")))
    stale = fake_build.store.builds / f"tiny-{spec.digest[:12]}-1.tmp-{dead.pid}"
    (stale / "rootfs").mkdir(parents=True)
    stale_link = fake_build.store.root / f".tiny.link-{dead.pid}"
    stale_link.symlink_to("builds/nowhere")
    foreign = fake_build.store.builds / f"other-{spec.digest[:12]}-1.tmp-{dead.pid}"
    foreign.mkdir()
    fake_build.store.build(spec, progress=lambda m: None)
    assert not stale.exists() and not stale_link.is_symlink()
    assert foreign.is_dir()  # another template's: left to that template's builds


def test_concurrent_builds_of_one_template_run_mmdebstrap_once(fake_build, tmp_path, monkeypatch):
    gate = tmp_path / "gate"
    monkeypatch.setenv("FAKE_GATE", str(gate))
    spec = load_spec(str(fake_build.spec("tiny")))
    results, messages = [], [[], []]

    def build(i):
        results.append(fake_build.store.build(spec, progress=messages[i].append))

    def wait_for(cond):
        deadline = time.monotonic() + 30
        while not cond() and time.monotonic() < deadline:
            time.sleep(0.01)

    first = threading.Thread(target=build, args=(0,), daemon=True)
    first.start()
    wait_for(fake_build.calls.exists)
    second = threading.Thread(target=build, args=(1,), daemon=True)
    second.start()
    wait_for(lambda: messages[1])
    gate.touch()
    first.join(60)
    second.join(60)
    assert messages[1][0] == "waiting for another build of tiny to finish"
    assert messages[1][-1].startswith("template tiny is up to date")
    assert fake_build.calls.read_text().count("\n") == 1
    assert results[0].path == results[1].path


# -- a real build (slow: opt in) -------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.skipif(
    os.environ.get("FORKD_TEST_REAL_BUILDS") != "1", reason="set FORKD_TEST_REAL_BUILDS=1 (~1 min)"
)
def test_real_minimal_build_and_broken_rebuild(tmp_path):
    if os.geteuid() != 0:
        pytest.skip("building needs root")
    store = TemplateStore(tmp_path / "state")
    good = store.build(load_spec(str(_write(tmp_path / "mini.toml", 'packages = ["python3-minimal"]\n'))))
    assert any(line.startswith("python3-minimal=") for line in good.versions().splitlines())
    assert (good.rootfs / "home/user").is_dir()  # the hooks ran without sudo in the package set
    broken = load_spec(
        str(_write(tmp_path / "mini.toml", 'packages = ["python3-minimal", "no-such-package-x"]\n'))
    )
    with pytest.raises(TemplateError, match="mmdebstrap failed"):
        store.build(broken)
    assert store.get("mini").path == good.path
    assert [p.name for p in store.builds.iterdir()] == [good.path.name]


def test_a_download_failure_is_retried_once_and_a_bad_definition_is_not(fake_build):
    messages: list[str] = []
    spec = load_spec(str(fake_build.spec("flaky", packages=["python3-minimal", "flaky-mirror"])))
    template = fake_build.store.build(spec, progress=messages.append)
    assert "  download failed: trying once more" in messages
    assert len(fake_build.calls.read_text().splitlines()) == 2
    assert not (template.rootfs / "partial").exists()  # the second try started from an empty tree
    # A definition that cannot work fails at once: no second try.
    broken = load_spec(str(fake_build.spec("bad", packages=["no-such-package"])))
    with pytest.raises(TemplateError):
        fake_build.store.build(broken, progress=messages.append)
    assert len(fake_build.calls.read_text().splitlines()) == 3
