"""An SSH DVC remote for real: `dvc push` from one repository and `dvc pull` into a fresh clone
through an `sshd` that the test starts on 127.0.0.1, with its own host key and client keys,
all in temporary folders.

One module-scoped server and one pushed project (raw digits, `dvc repro` of the two cheap
models, no TensorFlow, no MLflow server). Each SSH client (the project's owner, a teammate) has
its own key, named by `dvc remote modify --local` (`.dvc/config.local`, never committed), and its
own empty HOME, so that no ~/.ssh config, key or agent of the machine's user takes part.

Host keys: DVC does not check the server's. dvc-ssh has no known_hosts setting and sshfs, under
it, connects with asyncssh's `known_hosts=None` ("trust any host key"), so ~/.ssh/known_hosts
and ~/.ssh/config are not consulted; `test_dvc_does_not_check_the_host_key` pins that, and the
docs/team.md says so.
"""

from __future__ import annotations

import os
import pwd
import re
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import yaml

from tests.support import command_env, free_port, run, stages_run
from tests.team_support import make_project, missing_system_program, stop

SSHD = Path("/usr/sbin/sshd")
# sshd's privilege-separation folder, compiled in: a root sshd refuses to start without it
PRIVSEP_DIR = Path("/run/sshd")
MODELS = ("numpy_mlp", "logreg")  # seconds to train, no TensorFlow

pytestmark = pytest.mark.slow


def sshd_path() -> Path:
    """Debian's sshd; skipped here when absent, a failure under CI."""
    if SSHD.is_file() and os.access(SSHD, os.X_OK):
        return SSHD
    missing_system_program("needs Debian's openssh-server package (apt-get install openssh-server)")


@dataclass(frozen=True)
class SshHost:
    """The test's sshd: its port, the one user it lets in, its host key and its log."""

    port: int
    user: str
    host_public_key: str  # "ssh-ed25519 AAAA... host", the line a known_hosts entry trusts
    authorized_keys: Path
    log_path: Path

    def url(self, path: Path) -> str:
        """The DVC remote URL of an absolute path on this host."""
        return f"ssh://{self.user}@127.0.0.1:{self.port}{path}"

    def sftp_logins(self, fingerprint: str) -> int:
        """How many logins by the key with this fingerprint sshd has logged that opened an SFTP
        session (the channel DVC's SSH filesystem reads and writes through)."""
        accepted = (
            rf"Accepted publickey for {re.escape(self.user)} from 127\.0\.0\.1 port (\d+) ssh2: "
            rf"ED25519 {re.escape(fingerprint)}\n"
        )
        log = self.log_path.read_text()
        sftp = f"subsystem 'sftp' for {self.user} from 127.0.0.1 port {{}} "
        return sum(sftp.format(port) in log for port in re.findall(accepted, log))


@dataclass(frozen=True)
class SshClient:
    """One person's side: a key the server accepts and a HOME of their own."""

    keyfile: Path
    fingerprint: str  # "SHA256:...", as sshd logs it
    env: dict[str, str] = field(repr=False)  # command_env() with HOME set to this client's home


def keygen(keyfile: Path, comment: str) -> str:
    """A new passphrase-less ed25519 key pair at keyfile (and .pub); returns its fingerprint."""
    env = command_env()
    run(
        ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", comment, "-f", str(keyfile)],
        keyfile.parent,
        env,
    )
    listing = run(["ssh-keygen", "-l", "-f", f"{keyfile}.pub"], keyfile.parent, env)
    return listing.split()[1]  # "256 SHA256:... comment (ED25519)"


def make_client(folder: Path, host: SshHost) -> SshClient:
    """A client key authorized on host, and an empty HOME."""
    folder.mkdir()
    keyfile = folder / "id_ed25519"
    fingerprint = keygen(keyfile, folder.name)
    with host.authorized_keys.open("a") as authorized:
        authorized.write(Path(f"{keyfile}.pub").read_text())
    (folder / "home").mkdir()
    env = command_env()
    env.pop("SSH_AUTH_SOCK", None)  # no agent: the key named in .dvc/config.local logs in
    env["HOME"] = str(folder / "home")
    return SshClient(keyfile, fingerprint, env)


@contextmanager
def running_sshd(folder: Path) -> Iterator[SshHost]:
    """sshd on 127.0.0.1 on a free port, key logins only, for the current user; always stopped."""
    sshd = sshd_path()
    if os.geteuid() == 0:
        PRIVSEP_DIR.mkdir(mode=0o755, exist_ok=True)  # what Debian's ssh.service would create
    port = free_port()
    user = pwd.getpwuid(os.getuid()).pw_name
    keygen(folder / "host_ed25519", "host")
    authorized_keys = folder / "authorized_keys"
    authorized_keys.touch()
    # StrictModes no: the files live under /tmp, which is world-writable, and StrictModes
    # refuses keys below such a folder. UsePAM no: no PAM service is involved in key logins
    # (and a non-root sshd cannot use PAM). LogLevel VERBOSE logs each key's fingerprint.
    config = folder / "sshd_config"
    config.write_text(
        f"ListenAddress 127.0.0.1\n"
        f"Port {port}\n"
        f"HostKey {folder / 'host_ed25519'}\n"
        f"PidFile {folder / 'sshd.pid'}\n"
        f"AuthorizedKeysFile {authorized_keys}\n"
        f"AllowUsers {user}\n"
        "PubkeyAuthentication yes\n"
        "PasswordAuthentication no\n"
        "KbdInteractiveAuthentication no\n"
        "PermitRootLogin prohibit-password\n"
        "StrictModes no\n"
        "UsePAM no\n"
        "Subsystem sftp internal-sftp\n"
        "LogLevel VERBOSE\n"
    )
    log_path = folder / "sshd.log"
    with log_path.open("wb") as log_file:
        process = subprocess.Popen(
            [str(sshd), "-D", "-e", "-f", str(config)],  # -D: foreground, -e: log to stderr
            stdout=log_file,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        ready = f"Server listening on 127.0.0.1 port {port}."
        deadline = time.monotonic() + 20
        while ready not in log_path.read_text():
            if process.poll() is not None or time.monotonic() > deadline:
                state = "exited" if process.poll() is not None else "not ready after 20 s"
                pytest.fail(f"sshd {state}:\n{log_path.read_text()[-4000:]}")
            time.sleep(0.1)
        host_public_key = (folder / "host_ed25519.pub").read_text().strip()
        yield SshHost(port, user, host_public_key, authorized_keys, log_path)
    finally:
        stop(process)


@pytest.fixture(scope="module")
def ssh_host(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SshHost]:
    with running_sshd(tmp_path_factory.mktemp("sshd")) as host:
        yield host


@dataclass(frozen=True)
class Pushed:
    """The owner's repository after `dvc repro` and `dvc push` to the SSH remote."""

    origin: Path
    remote: Path  # the remote's folder on the SSH host's disk
    owner: SshClient
    raw_files: int


@pytest.fixture(scope="module")
def pushed(tmp_path_factory: pytest.TempPathFactory, ssh_host: SshHost) -> Pushed:
    """The project with `dvc add`ed raw digits, `dvc repro`, an SSH remote, `dvc push`."""
    folder = tmp_path_factory.mktemp("owner")
    origin = folder / "origin"
    origin.mkdir()
    remote = tmp_path_factory.mktemp("ssh-remote")
    owner = make_client(folder / "owner-ssh", ssh_host)
    raw_files = make_project(origin, models=MODELS)
    env = owner.env
    run(["dvc", "repro"], origin, env)  # MLflow: the local sqlite store, git-ignored
    run(["dvc", "remote", "add", "-d", "storage", ssh_host.url(remote)], origin, env)
    run(
        ["dvc", "remote", "modify", "--local", "storage", "keyfile", str(owner.keyfile)],
        origin,
        env,
    )
    run(["git", "add", "-A"], origin, env)
    run(["git", "commit", "-q", "-m", "dvc repro; the SSH remote"], origin, env)
    run(["dvc", "push"], origin, env)
    return Pushed(origin, remote, owner, raw_files)


def cached_objects(folder: Path) -> dict[str, bytes]:
    """Every object under a DVC cache or remote folder (files/md5/ab/cdef...), by relative path."""
    return {
        str(path.relative_to(folder)): path.read_bytes()
        for path in (folder / "files" / "md5").rglob("*")
        if path.is_file()
    }


def dvc_output_files(repo: Path) -> dict[str, bytes]:
    """Every file of every DVC-tracked path (`dvc add`ed data, stage outs), by relative path."""
    tracked = [  # a .dvc file's out paths are relative to its folder
        dvc_file.parent / out["path"]
        for dvc_file in repo.rglob("*.dvc")
        if dvc_file.is_file()
        for out in yaml.safe_load(dvc_file.read_text())["outs"]
    ]
    lock = yaml.safe_load((repo / "dvc.lock").read_text())
    tracked += [repo / out["path"] for stage in lock["stages"].values() for out in stage["outs"]]
    files = {}
    for path in tracked:
        for file in sorted(path.rglob("*")) if path.is_dir() else [path]:
            if file.is_file():
                files[str(file.relative_to(repo))] = file.read_bytes()
    return files


def test_push_stores_the_cache_in_the_remote_folder_over_ssh(
    pushed: Pushed, ssh_host: SshHost
) -> None:
    origin_cache = cached_objects(pushed.origin / ".dvc" / "cache")
    remote_objects = cached_objects(pushed.remote)
    assert len(remote_objects) > pushed.raw_files  # raw images, and the stages' outputs
    assert remote_objects.items() <= origin_cache.items()  # same names, same bytes
    # nothing but the `cache: false` outputs (metrics and model cards: git holds them; a
    # run-cache entry may keep a copy in the local cache, never pushed)
    not_pushed = {origin_cache[name] for name in origin_cache.keys() - remote_objects.keys()}
    assert not_pushed <= {
        (pushed.origin / folder / f"{model}{suffix}").read_bytes()
        for model in MODELS
        for folder, suffix in (("metrics", ".json"), ("cards", ".md"))
    }
    answers = {(pushed.origin / f"answers/{model}.csv").read_bytes() for model in MODELS}
    assert answers <= set(remote_objects.values())  # evaluate's cached outs are pushed
    # sshd let the owner's key in and DVC talked SFTP through it
    assert ssh_host.sftp_logins(pushed.owner.fingerprint) >= 1
    # git holds the remote's URL; the key's path stays in the git-ignored .dvc/config.local
    committed = run(["git", "show", "HEAD:.dvc/config"], pushed.origin, pushed.owner.env)
    assert ssh_host.url(pushed.remote) in committed and "keyfile" not in committed
    assert "keyfile" in (pushed.origin / ".dvc" / "config.local").read_text()
    tracked = run(["git", "ls-files"], pushed.origin, pushed.owner.env).split()
    assert ".dvc/config" in tracked and ".dvc/config.local" not in tracked


def openssh_login(host: SshHost, keyfile: Path, known_hosts: Path) -> subprocess.CompletedProcess:
    """`ssh ... true` with OpenSSH's client, checking the host key against known_hosts only."""
    options = ["BatchMode=yes", "StrictHostKeyChecking=yes", f"UserKnownHostsFile={known_hosts}"]
    return subprocess.run(
        [
            "ssh",
            *(f"-o{option}" for option in options),
            "-i",
            str(keyfile),
            "-p",
            str(host.port),
            f"{host.user}@127.0.0.1",
            "true",
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_dvc_does_not_check_the_host_key(pushed: Pushed, ssh_host: SshHost, tmp_path: Path) -> None:
    """A known_hosts that trusts another key for this host: OpenSSH refuses to connect, DVC
    logs in anyway. When a DVC upgrade starts checking, this fails: then give each client a
    known_hosts with the real key here and drop docs/team.md's warning."""
    keyfile = pushed.owner.keyfile
    home = tmp_path / "home"
    (home / ".ssh").mkdir(parents=True)
    real = home / ".ssh" / "known_hosts.real"
    real.write_text(f"[127.0.0.1]:{ssh_host.port} {ssh_host.host_public_key}\n")
    assert openssh_login(ssh_host, keyfile, real).returncode == 0  # the control
    keygen(tmp_path / "stranger_host_key", "stranger")
    stranger_key = (tmp_path / "stranger_host_key.pub").read_text().strip()
    known_hosts = home / ".ssh" / "known_hosts"  # where asyncssh would look, if it looked
    known_hosts.write_text(f"[127.0.0.1]:{ssh_host.port} {stranger_key}\n")
    refused = openssh_login(ssh_host, keyfile, known_hosts)
    assert refused.returncode == 255, refused.stderr
    assert "REMOTE HOST IDENTIFICATION HAS CHANGED" in refused.stderr, refused.stderr
    logins_before = ssh_host.sftp_logins(pushed.owner.fingerprint)

    env = {**pushed.owner.env, "HOME": str(home)}
    assert "in sync" in run(["dvc", "status", "--cloud"], pushed.origin, env)

    assert ssh_host.sftp_logins(pushed.owner.fingerprint) == logins_before + 1


def test_fresh_clone_pulls_identical_files_over_ssh_and_has_nothing_to_do(
    pushed: Pushed, ssh_host: SshHost, tmp_path: Path
) -> None:
    teammate = make_client(tmp_path / "teammate-ssh", ssh_host)
    env = teammate.env
    clone = tmp_path / "clone"
    run(["git", "clone", "-q", str(pushed.origin), str(clone)], tmp_path, env)
    assert not (clone / "data" / "raw" / "digits").exists()
    assert not (clone / ".dvc" / "cache").exists()  # nothing to copy from but the remote
    run(
        ["dvc", "remote", "modify", "--local", "storage", "keyfile", str(teammate.keyfile)],
        clone,
        env,
    )

    run(["dvc", "pull"], clone, env)

    assert ssh_host.sftp_logins(teammate.fingerprint) >= 1
    pulled = dvc_output_files(clone)
    assert pulled == dvc_output_files(pushed.origin)  # same paths, same bytes
    assert sum(name.startswith("data/raw/digits/") for name in pulled) == pushed.raw_files
    assert {"data/tables/gray16/train.parquet", "data/tables/gray16/test.parquet"} <= set(pulled)
    for model in MODELS:
        assert any(name.startswith(f"models/{model}/") for name in pulled), model
    assert "up to date" in run(["dvc", "status"], clone, env)
    assert "in sync" in run(["dvc", "status", "--cloud"], clone, env)
    assert stages_run(run(["dvc", "repro"], clone, env)) == set()
