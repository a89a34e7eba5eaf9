"""Real git servers on loopback for tests: `git http-backend` behind Basic auth, and `sshd`.

Both serve the repositories of one folder with the git binary's own upload-pack, so dulwich
talks to the same server code GitHub-like hosts run, over a real socket.
"""

from __future__ import annotations

import base64
import getpass
import os
import shutil
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclass
class HttpGitServer:
    url: str  # http://127.0.0.1:PORT, without credentials
    requests: list[str]  # "METHOD path status", one per request served


def _handler(root: Path, users: dict[str, str], requests: list[str], forbidden: set[str]):
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args) -> None:  # quiet: the test reads `requests` instead
            pass

        def _reply(self, status: int, extra: dict[str, str] | None = None) -> None:
            requests.append(f"{self.command} {self.path} {status}")
            self.send_response(status)
            for name, value in (extra or {}).items():
                self.send_header(name, value)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def _user(self) -> str | None:
            header = self.headers.get("Authorization", "")
            if not header.startswith("Basic "):
                return None
            user, _, password = base64.b64decode(header[6:]).decode().partition(":")
            return user if users.get(user) == password else None

        def _body(self) -> bytes:
            if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
                chunks = []
                while size := int(self.rfile.readline().strip() or b"0", 16):
                    chunks.append(self.rfile.read(size))
                    self.rfile.readline()
                self.rfile.readline()
                return b"".join(chunks)
            return self.rfile.read(int(self.headers.get("Content-Length") or 0))

        def _serve(self) -> None:
            path, _, query = self.path.partition("?")
            if users:
                user = self._user()
                if user is None:
                    return self._reply(401, {"WWW-Authenticate": 'Basic realm="git"'})
                if user in forbidden:
                    return self._reply(403)
            body = self._body() if self.command == "POST" else b""
            env = {
                "PATH": os.environ["PATH"],
                "GIT_PROJECT_ROOT": str(root),
                "GIT_HTTP_EXPORT_ALL": "1",
                "REQUEST_METHOD": self.command,
                "PATH_INFO": path,
                "QUERY_STRING": query,
                "CONTENT_TYPE": self.headers.get("Content-Type", ""),
                "CONTENT_LENGTH": str(len(body)),
                "REMOTE_ADDR": "127.0.0.1",
                "REMOTE_USER": "git",
                "GIT_PROTOCOL": self.headers.get("Git-Protocol", ""),
                "HTTP_CONTENT_ENCODING": self.headers.get("Content-Encoding", ""),
            }
            out = subprocess.run(
                ["git", "http-backend"], input=body, env=env, capture_output=True
            ).stdout
            head, _, payload = out.partition(b"\r\n\r\n")
            status, headers = 200, {}
            for line in head.decode().split("\r\n"):
                name, _, value = line.partition(": ")
                if name.lower() == "status":
                    status = int(value.split()[0])
                elif name:
                    headers[name] = value
            requests.append(f"{self.command} {self.path} {status}")
            self.send_response(status)
            for name, value in headers.items():
                self.send_header(name, value)
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload)

        do_GET = do_POST = _serve

    return Handler


@contextmanager
def http_git_server(
    root: Path, users: dict[str, str] | None = None, forbidden: set[str] = frozenset()
) -> Iterator[HttpGitServer]:
    """Serve the repositories under root at http://127.0.0.1:PORT/<name>; with `users`
    (name -> password) every request needs Basic auth; users in `forbidden` get 403."""
    requests: list[str] = []
    server = ThreadingHTTPServer(
        ("127.0.0.1", 0), _handler(root, users or {}, requests, set(forbidden))
    )
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield HttpGitServer(f"http://127.0.0.1:{server.server_address[1]}", requests)
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


@dataclass
class SshGitServer:
    port: int
    host_key: str  # "ssh-ed25519 AAAA...", the server's public host key
    user: str
    log: Path  # sshd's own log (-e): "Accepted publickey for ..." per login


def sshd_binary() -> str:
    found = shutil.which("sshd") or next(
        (p for p in ("/usr/sbin/sshd", "/usr/local/sbin/sshd") if os.path.exists(p)), None
    )
    if not found:
        raise RuntimeError(
            "sshd is not installed: install openssh-server (apt-get install openssh-server) "
            "to run the SSH git tests"
        )
    return found


def keygen(path: Path, passphrase: str = "") -> str:
    """A new ed25519 key pair at path (and path.pub); returns the public key line."""
    subprocess.run(
        ["ssh-keygen", "-q", "-t", "ed25519", "-N", passphrase, "-C", "test", "-f", str(path)],
        check=True,
    )
    return " ".join(path.with_suffix(".pub").read_text().split()[:2])


@contextmanager
def ssh_git_server(workdir: Path, client_public_keys: list[str]) -> Iterator[SshGitServer]:
    """sshd on a free loopback port that lets the given keys run git-upload-pack as this
    user; stopped (and waited for) on exit."""
    sshd = sshd_binary()
    workdir.mkdir(parents=True, exist_ok=True)
    host_key = keygen(workdir / "host_ed25519")
    authorized = workdir / "authorized_keys"
    authorized.write_text("".join(f"{key}\n" for key in client_public_keys))
    port = free_port()
    config = workdir / "sshd_config"
    config.write_text(
        f"Port {port}\nListenAddress 127.0.0.1\nHostKey {workdir / 'host_ed25519'}\n"
        f"AuthorizedKeysFile {authorized}\nPidFile {workdir / 'sshd.pid'}\n"
        "UsePAM no\nPermitRootLogin prohibit-password\nPasswordAuthentication no\n"
        "KbdInteractiveAuthentication no\nStrictModes no\nPubkeyAuthentication yes\n"
        "AcceptEnv GIT_PROTOCOL\nLogLevel VERBOSE\n"
    )
    os.makedirs("/run/sshd", exist_ok=True)  # privilege separation directory
    log = open(workdir / "sshd.log", "wb")  # noqa: SIM115 - closed after sshd stops
    proc = subprocess.Popen(
        [sshd, "-D", "-e", "-f", str(config)], stdout=subprocess.DEVNULL, stderr=log
    )
    try:
        for _ in range(200):
            if proc.poll() is not None:
                raise RuntimeError(f"sshd exited: {(workdir / 'sshd.log').read_text()}")
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                time.sleep(0.05)
        yield SshGitServer(port, host_key, getpass.getuser(), workdir / "sshd.log")
    finally:
        proc.terminate()
        proc.wait(10)
        log.close()
