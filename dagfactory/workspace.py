"""The pipeline's code at a pinned commit, and a virtualenv to run it in.

Git is spoken with dulwich (pure Python), so this works on hosts without a `git` binary, as many
managed Airflow images are. Everything is cached under `dagfactory_home()`:

    repos/<url hash>/          bare mirror of the remote (fetched under a file lock)
    checkouts/<commit>/        the commit's tree, made in a temp dir and renamed into place
    venvs/<requirements hash>/ virtualenv, built under a file lock, marked complete at the end

so concurrent runs share the cache without corrupting it, and an unchanged pipeline's second run
touches neither the network nor the installer.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import shutil
import stat
import subprocess
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

from filelock import FileLock

from dagfactory.errors import WorkspaceError
from dagfactory.spec import PipelineSpec

log = logging.getLogger(__name__)

BASE_REQUIREMENTS = ("distributed", "bokeh>=3.1")
"""Installed into every pipeline virtualenv: the Dask scheduler/worker and its dashboard."""
_SHA = re.compile(r"^[0-9a-f]{40}$")
_COMPLETE = ".dagfactory-complete"


@dataclass(frozen=True)
class Credentials:
    username: str | None = None
    password: str | None = None

    def __repr__(self) -> str:  # never show a secret, even in a debugger or a traceback
        return f"Credentials(username={self.username!r}, password=***)"


@dataclass(frozen=True)
class Workspace:
    """A checked-out commit and the virtualenv its requirements are installed in."""

    commit: str
    code_dir: Path
    venv_dir: Path

    @property
    def python(self) -> Path:
        return self.venv_dir / "bin" / "python"


def credentials_from_env(conn_id: str | None) -> Credentials | None:
    """Credentials of an Airflow connection given as AIRFLOW_CONN_<ID>=<uri> (for the CLI)."""
    if not conn_id:
        return None
    from urllib.parse import unquote

    uri = os.environ.get(f"AIRFLOW_CONN_{conn_id.upper()}")
    if not uri:
        raise WorkspaceError(
            f"source.connection {conn_id!r}: set AIRFLOW_CONN_{conn_id.upper()} to a URI such "
            "as https://user:token@host to run outside Airflow"
        )
    parts = urlsplit(uri)
    return Credentials(
        unquote(parts.username) if parts.username else None,
        unquote(parts.password) if parts.password else None,
    )


def dagfactory_home() -> Path:
    """Root of every cache: $DAGFACTORY_HOME, else dagfactory/ under $AIRFLOW_HOME."""
    if home := os.environ.get("DAGFACTORY_HOME"):
        return Path(home)
    airflow_home = os.environ.get("AIRFLOW_HOME") or os.path.expanduser("~/airflow")
    return Path(airflow_home) / "dagfactory"


def source_url(spec: PipelineSpec) -> str:
    """The remote to fetch from: URLs as written, paths made absolute against the YAML file."""
    git = spec.source.git.strip()
    if "://" in git or re.match(r"^[\w.-]+@[\w.-]+:", git):
        return git
    base = Path(spec.origin).parent if spec.origin else Path.cwd()
    return str((base / os.path.expanduser(git)).resolve())


def _display(url: str) -> str:
    """The URL as it may appear in a log or an error: never with credentials."""
    parts = urlsplit(url)
    if parts.password or parts.username:
        return parts._replace(netloc=parts.hostname or "").geturl()
    return url


def _client(url: str, credentials: Credentials | None):
    from dulwich.client import get_transport_and_path

    kwargs = {}
    if credentials and url.startswith(("http://", "https://")):
        kwargs = {"username": credentials.username, "password": credentials.password}
    return get_transport_and_path(url, quiet=True, **kwargs)


def resolve_commit(spec: PipelineSpec, credentials: Credentials | None = None) -> str:
    """The commit sha that `source.ref` names on the remote right now (asked once per run)."""
    ref = spec.source.ref
    if ref and _SHA.match(ref):
        return ref
    url = source_url(spec)
    try:
        client, path = _client(url, credentials)
        result = client.get_refs(path)
    except Exception as exc:
        raise WorkspaceError(
            f"cannot list the refs of {_display(url)} ({spec.origin}: source.git): "
            f"{_display(str(exc)) or type(exc).__name__}"
        ) from None
    refs = getattr(result, "refs", result)
    wanted = (
        [b"HEAD"]
        if not ref
        else [f"refs/heads/{ref}".encode(), f"refs/tags/{ref}".encode(), ref.encode()]
    )
    for name in wanted:
        if sha := refs.get(name):
            return _peel(url, sha.decode(), credentials)
    branches = sorted(n.decode()[11:] for n in refs if n.startswith(b"refs/heads/"))
    raise WorkspaceError(
        f"{spec.origin}: source.ref {ref!r} is neither a branch nor a tag of {_display(url)}; "
        f"branches there: {', '.join(branches) or 'none'}"
    )


def _peel(url: str, sha: str, credentials: Credentials | None) -> str:
    """The commit an annotated tag points at (fetching it), or sha itself for a commit."""
    from dulwich.objects import Tag
    from dulwich.repo import Repo

    with Repo(str(_fetch(url, sha, credentials))) as repo:
        obj = repo[sha.encode()]
        while isinstance(obj, Tag):
            obj = repo[obj.object[1]]
        return obj.id.decode()


def _fetch(url: str, commit: str, credentials: Credentials | None) -> Path:
    """A bare mirror of the remote that contains `commit` (fetched only when it does not)."""
    from dulwich.repo import Repo

    mirror = dagfactory_home() / "repos" / hashlib.sha256(url.encode()).hexdigest()[:16]
    mirror.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(f"{mirror}.lock"):
        repo = Repo(str(mirror)) if mirror.exists() else Repo.init_bare(str(mirror), mkdir=True)
        with repo:
            if commit.encode() in repo.object_store:
                return mirror
            log.info("fetching %s", _display(url))
            try:
                client, path = _client(url, credentials)
                result = client.fetch(path, repo)
            except Exception as exc:
                raise WorkspaceError(
                    f"cannot fetch {_display(url)}: {_display(str(exc)) or type(exc).__name__}"
                ) from None
            for name, sha in result.refs.items():
                if sha and not name.endswith(b"^{}") and name != b"HEAD":
                    repo.refs[b"refs/mirror/" + name.removeprefix(b"refs/")] = sha
            if commit.encode() not in repo.object_store:
                raise WorkspaceError(f"commit {commit} is not in {_display(url)}; check source.ref")
    return mirror


def _export(mirror: Path, commit: str, target: Path) -> None:
    """Write the commit's tree to target, atomically: readers see all of it or nothing."""
    from dulwich.objects import S_ISGITLINK
    from dulwich.repo import Repo

    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{commit[:12]}-", dir=target.parent))
    try:
        with Repo(str(mirror)) as repo:
            store = repo.object_store
            for entry in store.iter_tree_contents(repo[commit.encode()].tree):
                if S_ISGITLINK(entry.mode):
                    log.warning("skipping submodule %s", entry.path.decode())
                    continue
                dest = tmp / os.fsdecode(entry.path)
                dest.parent.mkdir(parents=True, exist_ok=True)
                data = store[entry.sha].data
                if stat.S_ISLNK(entry.mode):
                    os.symlink(os.fsdecode(data), dest)
                else:
                    dest.write_bytes(data)
                    dest.chmod(0o755 if entry.mode & 0o100 else 0o644)
        os.rename(tmp, target)
    except OSError:
        if not target.is_dir():  # another run won the race: its copy is as good as ours
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def checkout(spec: PipelineSpec, commit: str, credentials: Credentials | None = None) -> Path:
    """The repository's tree at `commit` (from the cache when it is there); returns its root."""
    target = dagfactory_home() / "checkouts" / commit
    if not target.is_dir():
        mirror = _fetch(source_url(spec), commit, credentials)
        _export(mirror, commit, target)
    return target


def code_dir_of(spec: PipelineSpec, root: Path) -> Path:
    """The folder of the checkout that holds the code (source.subdir)."""
    code_dir = (root / spec.source.subdir).resolve()
    if not code_dir.is_relative_to(root.resolve()) or not code_dir.is_dir():
        raise WorkspaceError(
            f"{spec.origin}: source.subdir {spec.source.subdir!r} is not a folder of commit "
            f"{root.name[:12]}"
        )
    return code_dir


def requirements_of(spec: PipelineSpec, root: Path, code_dir: Path) -> list[str]:
    """The requirement lines to install: the base ones, then the pipeline's."""
    reqs = spec.source.requirements
    if reqs is None:
        lines: list[str] = []
    elif isinstance(reqs, str):
        path = (code_dir / reqs).resolve()
        if not path.is_relative_to(root.resolve()) or not path.is_file():
            raise WorkspaceError(
                f"{spec.origin}: source.requirements {reqs!r} is not a file in the repository "
                f"(looked for {reqs} under source.subdir)"
            )
        lines = path.read_text().splitlines()
    else:
        lines = list(reqs)
    kept = [line.strip() for line in lines if line.strip() and not line.strip().startswith("#")]
    return [*BASE_REQUIREMENTS, *kept]


def _env_key(requirements: list[str]) -> str:
    text = "\n".join([sys.version, *requirements])
    return hashlib.sha256(text.encode()).hexdigest()[:20]


def _installer() -> list[str] | None:
    """uv when present (much faster), else None for venv + pip."""
    try:
        from uv import find_uv_bin

        return [find_uv_bin()]
    except (ImportError, FileNotFoundError):
        found = shutil.which("uv")
        return [found] if found else None


def _run(cmd: list[str], what: str, output: Callable[[str], None]) -> None:
    proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    for line in proc.stdout.splitlines():
        output(line)
    if proc.returncode:
        tail = "\n".join(proc.stdout.splitlines()[-20:])
        raise WorkspaceError(f"{what} failed (exit {proc.returncode}):\n{tail}")


def virtualenv(requirements: list[str], output: Callable[[str], None] = log.info) -> Path:
    """A virtualenv with `requirements` installed, shared by every pipeline that asks for them."""
    venv = dagfactory_home() / "venvs" / _env_key(requirements)
    if (venv / _COMPLETE).exists():
        return venv
    venv.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(f"{venv}.lock"):
        if (venv / _COMPLETE).exists():
            return venv
        shutil.rmtree(venv, ignore_errors=True)  # a build that died half-way
        req_file = venv.parent / f"{venv.name}.requirements.txt"
        req_file.write_text("\n".join(requirements) + "\n")
        uv = _installer()
        python = str(venv / "bin" / "python")
        if uv:
            _run([*uv, "venv", "--quiet", "--python", sys.executable, str(venv)], "uv venv", output)
            # Bytecode now, not at every start: each cluster start imports Dask afresh in
            # several processes, and hosts that set PYTHONDONTWRITEBYTECODE (or whose venvs
            # are read-only) would otherwise compile it from source every time.
            install = [*uv, "pip", "install", "--compile-bytecode", "--python", python]
            install += ["-r", str(req_file)]
        else:
            _run([sys.executable, "-m", "venv", str(venv)], "python -m venv", output)
            install = [python, "-m", "pip", "install", "--disable-pip-version-check"]
            install += ["-r", str(req_file)]
        _run(install, "installing the pipeline's requirements", output)
        if not uv:
            _run([python, "-m", "compileall", "-q", str(venv)], "compiling bytecode", output)
        (venv / _COMPLETE).write_text("\n".join(requirements) + "\n")
    return venv


def prepare(
    spec: PipelineSpec,
    commit: str,
    credentials: Credentials | None = None,
    output: Callable[[str], None] = log.info,
) -> Workspace:
    """Checkout and virtualenv for `commit`; a no-op apart from two stat calls when cached."""
    root = checkout(spec, commit, credentials)
    code_dir = code_dir_of(spec, root)
    venv = virtualenv(requirements_of(spec, root, code_dir), output)
    return Workspace(commit, code_dir, venv)
