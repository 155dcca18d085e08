"""A real PostgreSQL server for tests: Debian's `postgresql` package, a throw-away cluster in a temporary folder
on a free port, trust authentication on 127.0.0.1 only. initdb refuses to run as root, so under root (CI) the
cluster belongs to the package's `postgres` user."""
import getpass
import os
import pwd
import shutil
import subprocess
import tempfile
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import psycopg

from tests.conftest import free_port

POSTGRES_BIN_ROOT = Path("/usr/lib/postgresql")


def postgres_bin() -> Path | None:
    """The newest installed server's bin folder, or None when the package is not installed."""
    versions = sorted(POSTGRES_BIN_ROOT.glob("*/bin/initdb"), key=lambda p: int(p.parent.parent.name))
    return versions[-1].parent if versions else None


@dataclass(frozen=True)
class PostgresServer:
    port: int
    user: str

    def url(self, database: str) -> str:
        return f"postgresql+psycopg://{self.user}@127.0.0.1:{self.port}/{database}"

    def create_database(self) -> str:
        """A fresh, empty database on this server; its SQLAlchemy URL."""
        name = f"medzero_{uuid.uuid4().hex[:12]}"
        with psycopg.connect(host="127.0.0.1", port=self.port, user=self.user, dbname="postgres",
                             autocommit=True) as connection:
            connection.execute(f'CREATE DATABASE "{name}"')
        return self.url(name)


@contextmanager
def postgres_server() -> Iterator[PostgresServer]:
    bin_dir = postgres_bin()
    if bin_dir is None:
        raise FileNotFoundError("PostgreSQL is not installed (apt-get install postgresql)")
    as_root = os.geteuid() == 0
    owner = "postgres" if as_root else getpass.getuser()
    root = Path(tempfile.mkdtemp(prefix="medzero-pg-"))
    data = root / "data"
    try:
        if as_root:
            entry = pwd.getpwnam(owner)
            os.chown(root, entry.pw_uid, entry.pw_gid)
        run_as = ["runuser", "-u", owner, "--"] if as_root else []
        subprocess.run([*run_as, str(bin_dir / "initdb"), "-D", str(data), "-U", owner, "--auth=trust",
                        "-E", "UTF8", "--no-sync"], check=True, capture_output=True)
        port = free_port()
        options = f"-c listen_addresses=127.0.0.1 -c port={port} -c unix_socket_directories={root} -c fsync=off"
        subprocess.run([*run_as, str(bin_dir / "pg_ctl"), "-D", str(data), "-l", str(root / "server.log"),
                        "-o", options, "-w", "-t", "60", "start"], check=True, capture_output=True)
        try:
            yield PostgresServer(port, owner)
        finally:
            subprocess.run([*run_as, str(bin_dir / "pg_ctl"), "-D", str(data), "-m", "immediate", "-w", "stop"],
                           check=False, capture_output=True)
    finally:
        shutil.rmtree(root, ignore_errors=True)
