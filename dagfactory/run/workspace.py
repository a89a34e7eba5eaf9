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
import json
import logging
import os
import re
import shutil
import stat
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from filelock import FileLock

from dagfactory.errors import WorkspaceError
from dagfactory.spec.pipeline import PipelineSpec

log = logging.getLogger(__name__)

BASE_REQUIREMENTS = ("distributed", "bokeh>=3.1")
"""Installed into every pipeline virtualenv: the Dask scheduler/worker and its dashboard."""
_SHA = re.compile(r"^[0-9a-f]{40}$")
_SHORT_SHA = re.compile(r"^[0-9a-f]{4,39}$")
_SCP_LIKE = re.compile(r"^[\w.-]+@([\w.-]+):")
_COMPLETE = ".dagfactory-complete"
_HOST_KEY_ALIAS = "dagfactory-remote"


@dataclass(frozen=True)
class Credentials:
    """What an Airflow connection holds to authenticate a fetch: a login and a password (or
    token) for https; a private key, as text or as a file on this host, for ssh.

    Its repr shows no secret, so it may appear in a debugger, a traceback or a log.
    """

    username: str | None = None
    password: str | None = None
    private_key: str | None = None
    key_file: str | None = None
    passphrase: str | None = None
    host_key: str | None = None
    no_host_key_check: bool = False
    port: int | None = None

    def __repr__(self) -> str:
        def hidden(value: str | None) -> str:
            return "None" if value is None else "***"

        return (
            f"Credentials(username={self.username!r}, password={hidden(self.password)}, "
            f"private_key={hidden(self.private_key)}, key_file={self.key_file!r}, "
            f"passphrase={hidden(self.passphrase)}, host_key={self.host_key!r}, "
            f"no_host_key_check={self.no_host_key_check}, port={self.port})"
        )

    @classmethod
    def from_connection(
        cls,
        login: str | None,
        password: str | None,
        port: int | str | None = None,
        extra: dict[str, Any] | None = None,
    ) -> Credentials:
        """From the fields of an Airflow connection, with the extras of Airflow's SSH hook."""
        extra = extra or {}
        check = extra.get("no_host_key_check", False)
        return cls(
            username=login or None,
            password=password or None,
            private_key=extra.get("private_key") or None,
            key_file=extra.get("key_file") or None,
            passphrase=extra.get("private_key_passphrase") or None,
            host_key=extra.get("host_key") or None,
            no_host_key_check=str(check).strip().lower() in ("true", "1", "yes"),
            port=int(port) if port not in (None, "") else None,
        )

    def secrets(self) -> list[str]:
        """Every secret string, and each line of the key's body: what no message may hold."""
        found = [s for s in (self.password, self.private_key, self.passphrase) if s]
        if self.private_key:
            found += [line for line in _key_text(self.private_key).splitlines() if len(line) > 8]
        return found


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
    """Credentials of the Airflow connection AIRFLOW_CONN_<ID> (for the CLI), given as a URI
    (https://user:token@host, ssh://git@host?private_key=...) or as Airflow's JSON form."""
    if not conn_id:
        return None
    import json
    from urllib.parse import parse_qsl, unquote

    name = f"AIRFLOW_CONN_{conn_id.upper()}"
    value = os.environ.get(name, "").strip()
    if not value:
        raise WorkspaceError(
            f"source.connection {conn_id!r}: set {name} to a URI such as "
            "https://user:token@host (or an Airflow connection in JSON) to run outside Airflow"
        )
    try:
        if value.startswith("{"):
            data = json.loads(value)
            extra = data.get("extra") or {}
            if isinstance(extra, str):
                extra = json.loads(extra) if extra.strip() else {}
            return Credentials.from_connection(
                data.get("login"), data.get("password"), data.get("port"), extra
            )
        parts = urlsplit(value)
        extra = dict(parse_qsl(parts.query, keep_blank_values=True))
        if "__extra__" in extra:
            extra = json.loads(extra["__extra__"])
        return Credentials.from_connection(
            unquote(parts.username) if parts.username else None,
            unquote(parts.password) if parts.password else None,
            parts.port,
            extra,
        )
    except (ValueError, TypeError, AttributeError):  # the message must not quote the value
        raise WorkspaceError(
            f"source.connection {conn_id!r}: {name} is neither a connection URI nor Airflow's "
            "JSON form of a connection; see `airflow connections get --output json`"
        ) from None


def dagfactory_home() -> Path:
    """Root of every cache: $DAGFACTORY_HOME, else dagfactory/ under $AIRFLOW_HOME."""
    if home := os.environ.get("DAGFACTORY_HOME"):
        return Path(home)
    airflow_home = os.environ.get("AIRFLOW_HOME") or os.path.expanduser("~/airflow")
    return Path(airflow_home) / "dagfactory"


def source_url(spec: PipelineSpec) -> str:
    """The remote to fetch from: URLs as written, paths made absolute against the YAML file."""
    git = spec.source.git.strip()
    if "://" in git or _SCP_LIKE.match(git):
        return git
    base = Path(spec.origin).parent if spec.origin else Path.cwd()
    return str((base / os.path.expanduser(git)).resolve())


def _display(url: str) -> str:
    """The URL as it may appear in a log or an error: never with credentials."""
    parts = urlsplit(url)
    if parts.password or parts.username:
        return parts._replace(netloc=parts.hostname or "").geturl()
    return url


@dataclass(frozen=True)
class _Remote:
    """A remote as one run fetches it: URL, credentials, and what a message should name."""

    url: str
    credentials: Credentials | None
    connection: str | None
    origin: str

    @property
    def shown(self) -> str:
        return _display(self.url)

    @property
    def is_ssh(self) -> bool:
        return self.url.startswith(("ssh://", "git+ssh://", "ssh+git://")) or bool(
            _SCP_LIKE.match(self.url)
        )

    @property
    def host(self) -> str:
        if match := _SCP_LIKE.match(self.url):
            return match.group(1)
        return urlsplit(self.url).hostname or self.url

    def scrub(self, text: str) -> str:
        """text without any secret of the credentials (a server may echo what it was sent)."""
        for secret in sorted(self.credentials.secrets() if self.credentials else [], key=len)[::-1]:
            text = text.replace(secret, "***")
        return text


def _remote(spec: PipelineSpec, credentials: Credentials | None) -> _Remote:
    return _Remote(source_url(spec), credentials, spec.source.connection, spec.origin or "")


def _key_text(text: str) -> str:
    """A key as ssh reads it: real line breaks (URIs and UIs often carry "\\n") and a final one."""
    if "\n" not in text and "\\n" in text:
        text = text.replace("\\n", "\n")
    return text.strip() + "\n"


def _write_secret(path: Path, text: str) -> str:
    """Write text to a new file only this user can read (created so, never widened later)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as file:
        file.write(text)
    return str(path)


def _known_hosts_line(host_key: str) -> str:
    """A known_hosts line for the connection's host_key ("ssh-ed25519 AAAA...", a line of
    ssh-keyscan, or bare base64, which Airflow's SSH hook reads as an RSA key)."""
    lines = []
    for line in host_key.strip().splitlines():
        words = line.split()
        for i, word in enumerate(words[:-1]):
            if word.startswith(("ssh-", "ecdsa-", "sk-")):
                lines.append(f"{_HOST_KEY_ALIAS} {word} {words[i + 1]}")
                break
        else:
            if len(words) == 1:
                lines.append(f"{_HOST_KEY_ALIAS} ssh-rsa {words[0]}")
    return "".join(f"{line}\n" for line in lines)


def _ssh_options(remote: _Remote, tmp: Path) -> dict[str, Any]:
    """dulwich's SSH client arguments: the `ssh` command line and the key file for the remote.

    The key's text is written to a 0600 file in tmp and only the file's path reaches the
    command line; BatchMode makes a missing key or an unknown host an error, never a prompt.
    """
    import shlex

    prompts = ["-o", "BatchMode=yes"]
    options = ["ssh", "-o", "ConnectTimeout=30"]
    kwargs: dict[str, Any] = {}
    creds = remote.credentials
    if creds:
        key = _key_text(creds.private_key) if creds.private_key else None
        if key is None and creds.key_file:
            if not os.path.isfile(creds.key_file):
                raise WorkspaceError(
                    f"{remote.origin}: key_file {creds.key_file!r} of connection "
                    f"{remote.connection!r} is not a file on this host"
                )
            if creds.passphrase:
                key = _key_text(Path(creds.key_file).read_text())
            else:
                kwargs["key_filename"] = creds.key_file
        if key is not None:
            kwargs["key_filename"] = _write_secret(tmp / "key", key)
        if creds.passphrase and "key_filename" in kwargs:
            # ssh reads a passphrase only from a prompt: SSH_ASKPASS answers it from a 0600
            # file, so the passphrase is in no command line and no environment. Prompts stay
            # off otherwise: no password, no "trust this host?" question.
            _write_secret(tmp / "passphrase", creds.passphrase)
            askpass = tmp / "askpass"
            askpass.write_text(f"#!/bin/sh\nexec cat {shlex.quote(str(tmp / 'passphrase'))}\n")
            askpass.chmod(0o700)
            options[:0] = ["env", f"SSH_ASKPASS={askpass}", "SSH_ASKPASS_REQUIRE=force"]
            prompts = ["-o", "PasswordAuthentication=no", "-o", "KbdInteractiveAuthentication=no"]
            prompts += ["-o", "NumberOfPasswordPrompts=1"]
            if not creds.no_host_key_check:
                prompts += ["-o", "StrictHostKeyChecking=yes"]
        if "key_filename" in kwargs:
            options += ["-o", "IdentitiesOnly=yes"]
        elif creds.password:
            raise WorkspaceError(
                f"{remote.origin}: connection {remote.connection!r} gives a password for ssh "
                f"{remote.shown}; dagfactory authenticates ssh with a key only: put the key in "
                "the connection's extra (private_key or key_file)"
            )
        if creds.no_host_key_check:
            options += ["-o", "StrictHostKeyChecking=no", "-o", "UserKnownHostsFile=/dev/null"]
        elif creds.host_key:
            known = tmp / "known_hosts"
            known.write_text(_known_hosts_line(creds.host_key))
            options += ["-o", f"HostKeyAlias={_HOST_KEY_ALIAS}", "-o", "StrictHostKeyChecking=yes"]
            options += ["-o", f"UserKnownHostsFile={known}"]
        url_has_user = _SCP_LIKE.match(remote.url) or urlsplit(remote.url).username
        if creds.username and not url_has_user:
            kwargs["username"] = creds.username
        if creds.port and not (remote.url.startswith("ssh://") and urlsplit(remote.url).port):
            options += ["-p", str(creds.port)]
    kwargs["ssh_command"] = shlex.join(options + prompts)
    return kwargs


@contextmanager
def _transport(remote: _Remote) -> Iterator[tuple[Any, str]]:
    """A dulwich client and path for the remote. For ssh, the key and known_hosts files exist
    only while the client is in use: they are deleted as soon as the block ends."""
    from dulwich.client import get_transport_and_path

    creds = remote.credentials
    if not remote.is_ssh:
        kwargs = {}
        if creds and remote.url.startswith(("http://", "https://")):
            kwargs = {"username": creds.username, "password": creds.password}
        yield get_transport_and_path(remote.url, quiet=True, **kwargs)
        return
    tmp = Path(tempfile.mkdtemp(prefix="dagfactory-ssh-"))  # 0700: only this user enters
    try:
        yield get_transport_and_path(remote.url, quiet=True, **_ssh_options(remote, tmp))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


_NO_HOST = re.compile(
    r"Name or service not known|Failed to resolve|Could not resolve hostname|"
    r"nodename nor servname|Temporary failure in name resolution|getaddrinfo failed"
)


def _reason(exc: BaseException, remote: _Remote) -> str | None:
    """What went wrong and what to do, in one sentence; None when the error says nothing
    about the connection (the server refused the commit, say). Never holds a secret."""
    from dulwich.client import HTTPProxyUnauthorized, HTTPUnauthorized
    from dulwich.errors import NotGitRepository

    lines = getattr(exc, "stderr_lines", None) or []
    text = "\n".join([str(exc), *(line.decode(errors="replace") for line in lines)])
    status = re.search(r"unexpected http resp (\d+)", text)
    code = 401 if isinstance(exc, HTTPUnauthorized) else int(status[1]) if status else None
    conn = remote.connection
    if code in (401, 403):
        if conn and remote.credentials:
            return (
                f"authentication failed (HTTP {code}); check the login and password (token) "
                f"of the Airflow connection {conn!r} named by source.connection, and that they "
                "may read this repository"
            )
        return (
            f"the server asks for credentials (HTTP {code}); set source.connection to an "
            "Airflow connection whose login and password (a token) may read this repository"
        )
    if isinstance(exc, HTTPProxyUnauthorized):
        return "the HTTP proxy refused the request (HTTP 407); check the proxy settings"
    if code:
        return f"the server answered HTTP {code}; check source.git"
    if "Permission denied" in text:
        if conn and remote.credentials:
            return (
                f"the SSH server {remote.host} refused the key of the Airflow connection "
                f"{conn!r} named by source.connection; check its private_key or key_file (and "
                "private_key_passphrase) and that the public key may read this repository (a "
                "deploy key, say)"
            )
        return (
            f"the SSH server {remote.host} refused this host's keys; set source.connection "
            "to an Airflow SSH connection with a private_key that may read this repository"
        )
    if "Host key verification failed" in text or "REMOTE HOST IDENTIFICATION" in text:
        return (
            f"the host key of {remote.host} is unknown or does not match; put the server's key "
            "(a line of `ssh-keyscan HOST`) in the connection's extra as host_key, or set "
            "no_host_key_check: true there"
        )
    if isinstance(exc, NotGitRepository) or re.search(
        r"does not appear to be a git repository|[Rr]epository not found|No such file", text
    ):
        where = " (HTTP 404)" if remote.url.startswith(("http://", "https://")) else ""
        return f"no git repository at {remote.shown}{where}; check source.git"
    if "Connection refused" in text:
        return f"connection to {remote.host} refused; check the host and port in source.git"
    if _NO_HOST.search(text):
        return f"unknown host {remote.host}; check source.git"
    if re.search(r"timed out|Connection timed out", text):
        return f"connection to {remote.host} timed out; check source.git and the network"
    return None


def _failure(exc: BaseException, remote: _Remote, doing: str) -> WorkspaceError:
    """The error to raise for a dulwich failure: a sentence to act on, never a raw repr."""
    if isinstance(exc, WorkspaceError):
        return exc
    reason = _reason(exc, remote)
    if reason is None:
        detail = str(exc) if not isinstance(exc, KeyError) else ""
        reason = remote.scrub(_display(detail)) or f"{type(exc).__name__} from the server"
    return WorkspaceError(f"{remote.origin}: cannot {doing} {remote.shown}: {reason}")


def _list_refs(remote: _Remote) -> dict[bytes, bytes]:
    try:
        with _transport(remote) as (client, path):
            result = client.get_refs(path)
    except Exception as exc:
        raise _failure(exc, remote, "list the refs of") from None
    return {k: v for k, v in getattr(result, "refs", result).items() if v}


def resolve_commit(spec: PipelineSpec, credentials: Credentials | None = None) -> str:
    """The commit sha that `source.ref` names on the remote right now (asked once per run).

    A ref is a branch, a tag, a full sha, or an abbreviated sha that is the start of
    exactly one commit of the remote's branches and tags."""
    ref = spec.source.ref
    if ref and _SHA.match(ref):
        return ref
    remote = _remote(spec, credentials)
    refs = _list_refs(remote)
    wanted = (
        [b"HEAD"]
        if not ref
        else [f"refs/heads/{ref}".encode(), f"refs/tags/{ref}".encode(), ref.encode()]
    )
    for name in wanted:
        if sha := refs.get(name):
            if peeled := refs.get(name + b"^{}"):
                return peeled.decode()
            return _peel(remote, sha.decode())
    if ref and _SHORT_SHA.match(ref):
        return _resolve_short_sha(remote, ref)
    branches = sorted(n.decode()[11:] for n in refs if n.startswith(b"refs/heads/"))
    raise WorkspaceError(
        f"{spec.origin}: source.ref {ref!r} is neither a branch nor a tag of {remote.shown}; "
        f"branches there: {', '.join(branches) or 'none'}"
    )


def _resolve_short_sha(remote: _Remote, prefix: str) -> str:
    """The one commit of the remote's branches and tags whose sha starts with prefix."""
    from dulwich.repo import Repo

    mirror = _fetch_branches(remote)
    with Repo(str(mirror)) as repo:
        store = repo.object_store
        found = sorted(
            sha for sha in store.iter_prefix(prefix.encode()) if store[sha].type_name == b"commit"
        )
        if len(found) == 1:
            return found[0].decode()
        if not found:
            raise WorkspaceError(
                f"{remote.origin}: source.ref {prefix!r} is neither a branch nor a tag of "
                f"{remote.shown}, nor the start of the sha of a commit on its branches or tags; "
                "check source.ref"
            )
        listed = [
            f"{sha.decode()[:12]} ({store[sha].message.decode(errors='replace').splitlines()[0]})"
            if store[sha].message.strip()
            else sha.decode()[:12]
            for sha in found[:10]
        ]
    more = f" and {len(found) - 10} more" if len(found) > 10 else ""
    raise WorkspaceError(
        f"{remote.origin}: source.ref {prefix!r} is the start of {len(found)} commits of "
        f"{remote.shown}: {', '.join(listed)}{more}; write more characters of the sha"
    )


def _peel(remote: _Remote, sha: str) -> str:
    """The commit an annotated tag points at (fetching it), or sha itself for a commit."""
    from dulwich.objects import Tag
    from dulwich.repo import Repo

    with Repo(str(_fetch(remote, sha))) as repo:
        obj = repo[sha.encode()]
        while isinstance(obj, Tag):
            obj = repo[obj.object[1]]
        return obj.id.decode()


def _mirror(url: str, kind: str = "") -> Path:
    """Where the cache keeps a remote: the commit mirror, or (kind "full") the branch mirror."""
    digest = hashlib.sha256(url.encode()).hexdigest()[:16]
    return dagfactory_home() / "repos" / (f"{digest}-{kind}" if kind else digest)


def _open(mirror: Path):
    from dulwich.repo import Repo

    mirror.parent.mkdir(parents=True, exist_ok=True)
    return Repo(str(mirror)) if mirror.exists() else Repo.init_bare(str(mirror), mkdir=True)


def _fetch(remote: _Remote, commit: str) -> Path:
    """A bare mirror that holds `commit` and its tree; fetched when it does not.

    Only that commit is asked for, one commit deep where the server allows it: the remote's
    other branches (a gh-pages branch, a broken one) are never downloaded.
    """
    from dulwich.objects import Tag

    mirror = _mirror(remote.url)
    sha = commit.encode()
    with FileLock(f"{mirror}.lock"), _open(mirror) as repo:
        if sha in repo.object_store:
            return mirror
        log.info("fetching commit %s of %s", commit[:12], remote.shown)
        try:
            with _transport(remote) as (client, path):
                _fetch_one(client, path, repo, sha)
        except Exception as exc:
            if isinstance(exc, WorkspaceError) or _reason(exc, remote) is not None:
                raise _failure(exc, remote, "fetch") from None
            # The server refused the commit: it is not on the remote, or it is no branch or
            # tag tip and the server sends only those (older servers, some hosts).
            log.info("%s sends no commit %s by itself: %s", remote.shown, commit[:12], exc)
        if sha not in repo.object_store:
            return _fetch_from_branches(remote, commit)
        obj = repo[sha]
        while isinstance(obj, Tag):
            obj = repo[obj.object[1]]
        # A branch of the mirror, so that the next fetch says it has this commit already.
        repo.refs[b"refs/heads/fetched/" + obj.id] = obj.id
    return mirror


def _fetch_one(client: Any, path: str, repo: Any, sha: bytes) -> None:
    """Fetch one object and what it needs: one commit deep, or all its history from a server
    that cannot send shallow packs."""
    from dulwich.errors import GitProtocolError

    def want(refs: Any, depth: Any = None) -> list[bytes]:
        return [sha]

    try:
        client.fetch(path, repo, determine_wants=want, depth=1)
    except GitProtocolError as exc:
        if "shallow" not in str(exc):
            raise
        client.fetch(path, repo, determine_wants=want)


def _fetch_branches(remote: _Remote) -> Path:
    """A full mirror of the remote's branches and tags (for abbreviated shas and servers that
    send only branch and tag tips), brought up to date."""
    mirror = _mirror(remote.url, "full")
    with FileLock(f"{mirror}.lock"), _open(mirror) as repo:
        store = repo.object_store
        tips: dict[bytes, bytes] = {}

        def wanted(refs: Any, depth: Any = None) -> list[bytes]:
            for name, sha in refs.items():
                tip = name.startswith((b"refs/heads/", b"refs/tags/")) and not name.endswith(b"^{}")
                if sha and tip:
                    tips[name] = sha
            return sorted({sha for sha in tips.values() if sha not in store})

        log.info("fetching the branches and tags of %s", remote.shown)
        try:
            with _transport(remote) as (client, path):
                client.fetch(path, repo, determine_wants=wanted)
        except Exception as exc:
            raise _failure(exc, remote, "fetch the branches and tags of") from None
        for name, sha in tips.items():
            if sha in store and store[sha].type_name == b"commit":
                repo.refs[b"refs/heads/mirror/" + name.removeprefix(b"refs/")] = sha
    return mirror


def _fetch_from_branches(remote: _Remote, commit: str) -> Path:
    mirror = _fetch_branches(remote)
    with _open(mirror) as repo:
        if commit.encode() not in repo.object_store:
            raise WorkspaceError(
                f"{remote.origin}: commit {commit} is not in any branch or tag of "
                f"{remote.shown}; check source.ref"
            )
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


def checkout_dir(commit: str) -> Path:
    """Where this host keeps the tree of `commit` (the cache is per host, under DAGFACTORY_HOME)."""
    return dagfactory_home() / "checkouts" / commit


def checkout(spec: PipelineSpec, commit: str, credentials: Credentials | None = None) -> Path:
    """The repository's tree at `commit` (from the cache when it is there); returns its root."""
    target = checkout_dir(commit)
    if not target.is_dir():
        mirror = _fetch(_remote(spec, credentials), commit)
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


def requirements_of(
    spec: PipelineSpec, root: Path, code_dir: Path, pins: dict[str, str] | None = None
) -> list[str]:
    """The requirement lines to install: the base ones, then the pipeline's.

    `pins` are versions the cluster runs (an existing cluster's `distributed`, say): a base
    requirement they name, or a package they add, is written `name==version`, unless the
    pipeline's own requirements name that package, in which case theirs wins (and the
    backend's version check says so if it does not match the cluster).
    """
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
    pinned = {_requirement_name(name): version for name, version in (pins or {}).items()}
    for line in kept:
        pinned.pop(_requirement_name(line), None)
    base = []
    for line in BASE_REQUIREMENTS:
        name = _requirement_name(line)
        base.append(f"{name}=={pinned.pop(name)}" if name in pinned else line)
    return [*base, *(f"{name}=={version}" for name, version in sorted(pinned.items())), *kept]


def _requirement_name(line: str) -> str:
    """The normalized project name a requirement line installs ('' for options, URLs)."""
    from packaging.requirements import InvalidRequirement, Requirement
    from packaging.utils import canonicalize_name

    try:
        return canonicalize_name(Requirement(line.split(" #", 1)[0].strip()).name)
    except InvalidRequirement:
        return ""


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


def pipeline_packages(venv_dir: Path) -> list[str]:
    """The pipeline's own requirements as its virtualenv has them, `name==version` (lines that
    name no project, such as URLs, as written): what a cluster built from a stock Dask image
    must install to run the pipeline's tasks with the client's versions."""
    try:
        lines = (venv_dir / _COMPLETE).read_text().splitlines()
    except FileNotFoundError:  # not a virtualenv of ours: nothing of a pipeline's in it
        return []
    base = {_requirement_name(line) for line in (*BASE_REQUIREMENTS, "dask")}
    named = {line: _requirement_name(line) for line in lines if line.strip()}
    wanted = sorted({name for name in named.values() if name and name not in base})
    probe = (
        "import importlib.metadata as m, json, sys; "
        "print(json.dumps({n: m.version(n) for n in sys.argv[1:]}))"
    )
    found = subprocess.run(
        [str(venv_dir / "bin" / "python"), "-c", probe, *wanted],
        capture_output=True,
        text=True,
        check=True,
    )
    versions = json.loads(found.stdout)
    unnamed = [line for line, name in named.items() if not name]
    return [*(f"{name}=={versions[name]}" for name in wanted), *unnamed]


def prepare(
    spec: PipelineSpec,
    commit: str,
    credentials: Credentials | None = None,
    output: Callable[[str], None] = log.info,
    pins: dict[str, str] | None = None,
) -> Workspace:
    """Checkout and virtualenv for `commit`; a no-op apart from two stat calls when cached.

    pins: versions the cluster needs in the virtualenv (see `requirements_of`).
    """
    root = checkout(spec, commit, credentials)
    code_dir = code_dir_of(spec, root)
    venv = virtualenv(requirements_of(spec, root, code_dir, pins), output)
    # "Last used" stamps, which `dagfactory prune` goes by: installs and fetches do not
    # update these times, runs do.
    url = source_url(spec)
    for used in (root, venv / _COMPLETE, _mirror(url), _mirror(url, "full")):
        with suppress(OSError):  # a mirror never made, a read-only cache: nothing to stamp
            os.utime(used)
    return Workspace(commit, code_dir, venv)


def _local_repository(spec: PipelineSpec) -> Path | None:
    """The folder of source.git when it is a repository on this machine (a path or file://)."""
    git = spec.source.git.strip()
    if git.startswith("file://"):
        return Path(urlsplit(git).path)
    if "://" in git or _SCP_LIKE.match(git):
        return None
    return Path(source_url(spec))


def local_changes(spec: PipelineSpec) -> list[str]:
    """Paths under source.subdir that differ from HEAD in the working tree of a local
    repository (staged, modified, deleted or untracked and not ignored): what a run of the
    commit would not see. Empty for remote URLs and bare repositories."""
    from dulwich import porcelain
    from dulwich.errors import NotGitRepository
    from dulwich.repo import Repo

    path = _local_repository(spec)
    if path is None:
        return []
    try:
        repo = Repo(str(path))
    except (NotGitRepository, OSError):
        return []
    with repo:
        if repo.bare:
            return []
        status = porcelain.status(repo, untracked_files="all")
    changed = [*status.unstaged, *status.untracked]
    for paths in status.staged.values():
        changed += paths
    names = sorted({os.fsdecode(p) for p in changed})
    subdir = Path(spec.source.subdir).as_posix().strip("/") if spec.source.subdir else ""
    if subdir in ("", "."):
        return names
    return [name for name in names if name == subdir or name.startswith(f"{subdir}/")]


def prepare_worktree(
    spec: PipelineSpec,
    output: Callable[[str], None] = log.info,
    pins: dict[str, str] | None = None,
) -> Workspace:
    """The working tree of a local repository as it is, uncommitted changes included, and a
    virtualenv of its requirements; the commit reads `<HEAD sha>+worktree`."""
    from dulwich.errors import NotGitRepository
    from dulwich.repo import Repo

    path = _local_repository(spec)
    if path is None:
        raise WorkspaceError(
            f"{spec.origin}: source.git {spec.source.git!r} is not a repository on this "
            "machine; only a local repository's working tree can run as it is"
        )
    try:
        repo = Repo(str(path))
    except (NotGitRepository, OSError):
        raise WorkspaceError(
            f"{spec.origin}: source.git: no git repository at {path}; check source.git"
        ) from None
    with repo:
        if repo.bare:
            raise WorkspaceError(
                f"{spec.origin}: source.git {path} is a bare repository: it has no working tree"
            )
        try:
            head = repo.head().decode()
        except KeyError:
            raise WorkspaceError(
                f"{spec.origin}: the repository at {path} has no commit yet; commit once"
            ) from None
    root = path.resolve()
    code_dir = code_dir_of(spec, root)
    venv = virtualenv(requirements_of(spec, root, code_dir, pins), output)
    return Workspace(f"{head}+worktree", code_dir, venv)
