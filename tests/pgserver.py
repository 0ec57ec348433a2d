"""A throwaway PostgreSQL server for the tests: Debian's binaries, a temporary directory, 127.0.0.1.

    python3 tests/pgserver.py start DIR    # prints postgresql://suite:PASSWORD@127.0.0.1:PORT/suite
    python3 tests/pgserver.py stop DIR

Standard library only, so that ``.ci/run`` can use it before any virtual environment exists. Run
as root (as CI does), the server runs as the ``postgres`` user that Debian's package creates
(PostgreSQL refuses to run as root). The superuser ``suite`` has a random password, so that the
tests can check that it never leaks.
"""

from __future__ import annotations

import glob
import os
import secrets
import shutil
import socket
import subprocess
import sys
from pathlib import Path

__all__ = ["find_bin", "start", "stop"]

USER = "suite"


def find_bin() -> Path | None:
    """The directory of initdb and pg_ctl (Debian keeps them out of PATH), or None."""
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"),
                   key=lambda p: int(Path(p).parts[-3]) if Path(p).parts[-3].isdigit() else 0)
    if found:
        return Path(found[-1]).parent
    which = shutil.which("initdb")
    return Path(which).resolve().parent if which else None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _as_server_user(cmd: list[str]) -> list[str]:
    if os.geteuid() != 0:
        return cmd
    return ["runuser", "-u", "postgres", "--", *cmd]


def start(directory: str | Path) -> str:
    """Initialise and start a server in ``directory``; return its URL (a database ``suite``)."""
    bin_dir = find_bin()
    if bin_dir is None:
        raise RuntimeError("no PostgreSQL binaries (initdb); install Debian's postgresql package")
    root = Path(directory).resolve()
    root.mkdir(parents=True, exist_ok=True)
    password = "pw-" + secrets.token_hex(12)
    (root / "pwfile").write_text(password + "\n")
    (root / "pwfile").chmod(0o600)
    if os.geteuid() == 0:
        shutil.chown(root, "postgres")
        shutil.chown(root / "pwfile", "postgres")
    data, port = root / "data", _free_port()
    run = lambda cmd: subprocess.run(_as_server_user(cmd), check=True, capture_output=True,  # noqa: E731
                                     text=True, timeout=120, cwd=root)
    run([str(bin_dir / "initdb"), "-D", str(data), "-U", USER, f"--pwfile={root / 'pwfile'}",
         "--auth=scram-sha-256", "-E", "UTF8", "--no-sync"])
    options = (f"-c listen_addresses=127.0.0.1 -p {port} -c unix_socket_directories={root} "
               "-c fsync=off -c max_connections=200")
    run([str(bin_dir / "pg_ctl"), "-D", str(data), "-o", options, "-l", str(root / "server.log"),
         "-w", "-t", "60", "start"])
    env = {**os.environ, "PGPASSWORD": password}
    subprocess.run([str(bin_dir / "createdb"), "-h", "127.0.0.1", "-p", str(port), "-U", USER,
                    USER], check=True, capture_output=True, env=env, timeout=60)
    url = f"postgresql://{USER}:{password}@127.0.0.1:{port}/{USER}"
    (root / "url").write_text(url + "\n")
    return url


def stop(directory: str | Path) -> None:
    """Stop the server started in ``directory`` (nothing when there is none)."""
    bin_dir, data = find_bin(), Path(directory).resolve() / "data"
    if bin_dir is None or not (data / "postmaster.pid").exists():
        return
    subprocess.run(_as_server_user([str(bin_dir / "pg_ctl"), "-D", str(data), "-m", "fast", "-w",
                                    "stop"]), capture_output=True, timeout=120)


if __name__ == "__main__":
    if len(sys.argv) != 3 or sys.argv[1] not in ("start", "stop"):
        sys.exit(f"usage: {sys.argv[0]} start|stop DIR")
    if sys.argv[1] == "start":
        print(start(sys.argv[2]))
    else:
        stop(sys.argv[2])
