"""Which isolation layer the python sandbox can use here, and the command line that applies it.

Layers, strongest first (recipe `tools.python.sandbox`: auto picks the first that works):
- bwrap: bubblewrap with every namespace unshared (no network, own pids, no host IPC), a
  read-only view of /usr and the base interpreter's stdlib only (no /etc, /home, /root, the run
  folder or the project's packages), the call's temp folder as the only writable path,
  capabilities dropped, and the sandbox's pid 1 killing everything left when the code exits.
- unshare: util-linux `unshare` with a network and a pid namespace; the host filesystem stays
  visible (read with the user's rights, written wherever the user may write).
- none: no namespaces; only resource limits, in-process socket denial and process-group kills.
Resource limits (sandbox_prelude.py) and the pids cgroup (pids_cgroup.py) apply on every layer.

Packages named in `tools.python.packages` (numpy, PIL, ...) are taken from metis's own
environment: under bwrap each is bound read-only at /opt/metis-packages/<name>, beside the
`*.libs` folders of shared libraries that wheels vendor; on the weaker layers a folder of
symlinks in the call's scratch folder stands in. Nothing else of the environment is visible.

Each layer is probed once per process by running the real interpreter through it; anything
missing is logged once as a warning that names the fix.
"""

from __future__ import annotations

import functools
import logging
import os
import shutil
import subprocess
import sys
import sysconfig
import tempfile
from dataclasses import dataclass
from pathlib import Path

from metis_cli.agent.tools.pids_cgroup import pids_cgroup_parent
from metis_cli.errors import ToolConfigError

log = logging.getLogger("metis.tools.python")

LAYERS = ("bwrap", "unshare", "none")
SANDBOX_WORKDIR = "/sandbox"  # where the call's temp folder appears inside bwrap
INSTALL_BWRAP = "install bubblewrap (Debian/Ubuntu: apt-get install -y bubblewrap)"
SHM_BYTES = 64 * 2**20
SANDBOX_PACKAGES = "/opt/metis-packages"  # where exposed packages appear inside bwrap
_PACKAGES_LINKS = ".metis-packages"  # the symlink folder in the scratch folder on other layers
_PROBE_TIMEOUT_S = 20.0
_warned: set[str] = set()


def warn_once(message: str) -> None:
    if message not in _warned:
        _warned.add(message)
        log.warning(message)


def base_interpreter() -> Path:
    """The interpreter the venv was made from: it runs without the venv's (the project's) packages."""
    candidate = getattr(sys, "_base_executable", None) or sys.executable
    version = f"python{sys.version_info.major}.{sys.version_info.minor}"
    for path in (Path(sys.base_prefix) / "bin" / version, Path(candidate)):
        if path.exists():
            return path.resolve()
    return Path(sys.executable).resolve()


def _hidden_package_dirs() -> list[str]:
    """Installed-package folders to cover inside the sandbox (the stdlib stays visible)."""
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    base = sys.base_prefix
    candidates = {
        sysconfig.get_path("purelib", vars={"base": base, "platbase": base}),
        sysconfig.get_path("platlib", vars={"base": base, "platbase": base}),
        "/usr/lib/python3/dist-packages",
        f"/usr/local/lib/python{version}/dist-packages",
        f"/usr/local/lib/python{version}/site-packages",
    }
    return sorted(path for path in candidates if path and os.path.isdir(path))


def package_paths(names: tuple[str, ...] | list[str]) -> tuple[Path, ...]:
    """The folders (or one-file modules) of importable packages `names` in metis's environment,
    plus every `*.libs` folder beside them; ToolConfigError for a name that is not installed."""
    import importlib.util

    found: list[Path] = []
    for name in names:
        spec = importlib.util.find_spec(name) if name.isidentifier() else None
        if spec is None or not (spec.submodule_search_locations or spec.origin):
            raise ToolConfigError(
                f"tools.python.packages: {name!r} is not importable in metis's environment ({sys.prefix}); "
                "install it there (pip install ...) or remove it from the list"
            )
        locations = list(spec.submodule_search_locations or [])
        path = Path(locations[0] if locations else spec.origin).resolve()
        found.append(path)
        found += sorted(path.parent.glob("*.libs"))
    return tuple(dict.fromkeys(found))


def bwrap_command(bwrap: str, interpreter: Path, host_workdir: str, packages: tuple[Path, ...] = ()) -> list[str]:
    """bubblewrap arguments up to (not including) the interpreter."""
    command = [
        bwrap, "--unshare-all", "--die-with-parent", "--new-session",
        "--unshare-user", "--uid", "65534", "--gid", "65534", "--disable-userns", "--cap-drop", "ALL",
        "--hostname", "sandbox", "--ro-bind", "/usr", "/usr",
    ]  # fmt: skip
    for top in ("/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32"):
        if os.path.islink(top):
            command += ["--symlink", os.readlink(top), top]
        elif os.path.isdir(top):
            command += ["--ro-bind", top, top]
    prefix = Path(sys.base_prefix).resolve()
    if not str(interpreter).startswith("/usr/"):
        # e.g. pyenv under /root: expose its lib/ (stdlib, libpython) and the binary, nothing else.
        for path in (str(prefix / "lib"), str(interpreter)):
            command += ["--ro-bind", path, path]
    for folder in _hidden_package_dirs():
        command += ["--tmpfs", folder, "--remount-ro", folder]
    for package in packages:
        command += ["--ro-bind", str(package), f"{SANDBOX_PACKAGES}/{package.name}"]
    command += [
        "--bind", host_workdir, SANDBOX_WORKDIR, "--chdir", SANDBOX_WORKDIR, "--proc", "/proc", "--dev", "/dev",
        # multiprocessing needs a writable /dev/shm; a small bounded one.
        "--size", str(SHM_BYTES), "--tmpfs", "/dev/shm",
        # bwrap's / and /dev are writable tmpfs (RAM): freeze them once every mount point exists.
        "--remount-ro", "/dev", "--remount-ro", "/",
        "--clearenv", "--setenv", "HOME", SANDBOX_WORKDIR, "--setenv", "TMPDIR", SANDBOX_WORKDIR,
        "--setenv", "PATH", "/usr/bin:/bin", "--setenv", "LANG", "C.UTF-8",
    ]  # fmt: skip
    return command


def unshare_command(unshare: str) -> list[str]:
    """util-linux unshare arguments: fresh network and pid namespaces; pid 1 is the sandboxed code."""
    command = [unshare, "--net", "--pid", "--fork", "--kill-child", "--mount-proc"]
    if os.geteuid() != 0:
        command.append("--map-root-user")  # unprivileged namespaces need a user namespace
    return command


def remove_scratch(path: str) -> None:
    """Delete a call's (or session's) scratch folder even if the code made parts of it read-only."""
    try:
        shutil.rmtree(path)
        return
    except OSError:
        pass
    for root, folders, _ in os.walk(path):
        for folder in folders:
            os.chmod(os.path.join(root, folder), 0o700)
    shutil.rmtree(path)


def scrubbed_env(workdir: str) -> dict[str, str]:
    """The whole environment of a sandboxed process: no tokens, keys or paths of the host."""
    return {"HOME": workdir, "TMPDIR": workdir, "PATH": "/usr/bin:/bin", "LANG": "C.UTF-8"}


@dataclass(frozen=True)
class Isolation:
    """What a python call will run under. `weaknesses` lists what this layer does not protect."""

    layer: str
    interpreter: Path
    launcher: str | None = None  # absolute path of bwrap/unshare; None for layer "none"
    weaknesses: tuple[str, ...] = ()
    pids_cgroup: Path | None = None

    def command(self, host_workdir: str, packages: tuple[Path, ...] = ()) -> tuple[list[str], str]:
        """(command up to and including the interpreter's flags, the workdir as the code sees it)."""
        python = [str(self.interpreter), "-I", "-S", "-X", "utf8"]
        if self.layer == "bwrap":
            return bwrap_command(self.launcher, self.interpreter, host_workdir, packages) + python, SANDBOX_WORKDIR
        if self.layer == "unshare":
            return unshare_command(self.launcher) + python, host_workdir
        return python, host_workdir

    def packages_dir(self, host_workdir: str, packages: tuple[Path, ...]) -> str:
        """The folder the code imports `packages` from ("" when there are none); on layers
        without bwrap, a folder of symlinks made in the scratch folder."""
        if not packages:
            return ""
        if self.layer == "bwrap":
            return SANDBOX_PACKAGES
        links = Path(host_workdir, _PACKAGES_LINKS)
        links.mkdir()
        for package in packages:
            (links / package.name).symlink_to(package)
        return str(links)

    def describe(self) -> str:
        text = f"sandbox={self.layer}"
        return text + (f" (weaker: {'; '.join(self.weaknesses)})" if self.weaknesses else "")


def _probe(candidate: Isolation) -> str | None:
    """None if the candidate layer runs the interpreter here, else why not."""
    name = candidate.launcher or str(candidate.interpreter)
    with tempfile.TemporaryDirectory(prefix="metis-probe-") as workdir:
        command, _ = candidate.command(workdir)
        try:
            done = subprocess.run(
                [*command, "-c", "print('ok')"], capture_output=True, text=True,
                timeout=_PROBE_TIMEOUT_S, env=scrubbed_env(workdir), cwd=workdir,
            )  # fmt: skip
        except (OSError, subprocess.TimeoutExpired) as error:
            return f"`{name}` failed to start: {error}"
    if done.returncode != 0 or done.stdout.strip() != "ok":
        detail = (done.stderr.strip().splitlines() or [f"exit status {done.returncode}"])[-1]
        return f"`{name}` failed: {detail}"
    return None


def _weaknesses(layer: str, cgroup: Path | None) -> list[str]:
    weak = []
    if layer != "bwrap":
        weak.append(f"no filesystem isolation: model code can read and write host files ({INSTALL_BWRAP})")
    if layer == "none":
        weak.append(
            "no network or pid namespace: sockets are denied in-process only and model code can signal host processes"
        )
    if os.geteuid() == 0 and cgroup is None:
        weak.append(
            "running as root without a writable pids cgroup: RLIMIT_NPROC does not apply to root, "
            "so fork bombs are stopped only by the timeout"
        )
    return weak


def choose_isolation(requested: str) -> Isolation:
    """The layer for `requested` (auto|bwrap|unshare|none); warns about anything weaker than bwrap.

    Probed once per process and PATH (launchers are looked up on PATH)."""
    return _choose_isolation(requested, os.environ.get("PATH", ""))


@functools.cache
def _choose_isolation(requested: str, search_path: str) -> Isolation:
    if requested not in ("auto", *LAYERS):
        raise ToolConfigError(f"tools.python.sandbox: unknown value {requested!r}; use auto, bwrap, unshare or none")
    interpreter = base_interpreter()
    candidates = LAYERS if requested == "auto" else (requested,)
    failures = []
    for layer in candidates:
        launcher = None if layer == "none" else shutil.which(layer, path=search_path)
        candidate = Isolation(layer, interpreter, launcher)
        if layer == "none":
            break
        problem = f"`{layer}` is not installed" if launcher is None else _probe(candidate)
        if problem is None:
            break
        failures.append(f"{layer}: {problem}")
    else:
        raise ToolConfigError(
            f"tools.python.sandbox: {requested} is not usable here ({'; '.join(failures)}). "
            f"For bwrap, {INSTALL_BWRAP}; or set tools.python.sandbox: auto to use the strongest available layer."
        )
    cgroup = pids_cgroup_parent()
    isolation = Isolation(layer, interpreter, candidate.launcher, tuple(_weaknesses(layer, cgroup)), cgroup)
    if isolation.weaknesses:
        missing = f" Unavailable: {'; '.join(failures)}." if failures else ""
        log.warning(f"python tool sandbox is weaker than it should be: {'; '.join(isolation.weaknesses)}.{missing}")
    return isolation
