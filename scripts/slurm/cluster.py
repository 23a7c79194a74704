"""A throwaway single-node SLURM cluster (munge, MariaDB, slurmdbd, slurmctld, slurmd) in a temporary folder.

Used by scripts/slurm/test_slurm.py (`make test-slurm`). Everything it starts runs in the foreground of a child
process whose PID it keeps; `stop()` ends exactly those PIDs (SIGTERM, then SIGKILL after a grace period). It
needs root and the Debian packages `slurm-wlm munge slurmdbd mariadb-server` (`install()` adds them with apt).
Nothing under /etc is read or changed: clients find the cluster through the SLURM_CONF variable of `env()`.
"""
from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

PACKAGES = ["slurm-wlm", "munge", "slurmdbd", "mariadb-server"]
DAEMONS = ["munged", "mariadbd", "mariadb-install-db", "slurmdbd", "slurmctld", "slurmd", "sbatch", "sacct"]


class ClusterError(RuntimeError):
    """SLURM cannot be installed or started here; the message says why."""


def missing_programs() -> list[str]:
    return [p for p in DAEMONS if shutil.which(p) is None and not Path("/usr/sbin", p).exists()]


def install(log=print) -> None:
    """apt-get the packages (root, Debian/Ubuntu). Services are kept from starting (policy-rc.d) while they
    install: this harness starts its own daemons with its own configuration."""
    if not missing_programs():
        return
    if os.geteuid() != 0:
        raise ClusterError(f"SLURM is not installed ({', '.join(missing_programs())} missing) and this is not "
                           f"root: run as root, or install {' '.join(PACKAGES)} first")
    if shutil.which("apt-get") is None:
        raise ClusterError(f"SLURM is not installed and there is no apt-get: install {' '.join(PACKAGES)} "
                           "with this system's package manager")
    policy = Path("/usr/sbin/policy-rc.d")
    ours = not policy.exists()
    if ours:
        policy.write_text("#!/bin/sh\nexit 101\n")
        policy.chmod(0o755)
    try:
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        for cmd in (["apt-get", "update"], ["apt-get", "install", "-y", "--no-install-recommends", *PACKAGES]):
            log("$ " + " ".join(cmd))
            done = subprocess.run(cmd, env=env, capture_output=True, text=True)
            if done.returncode != 0:
                tail = "\n".join((done.stdout + done.stderr).strip().splitlines()[-8:])
                raise ClusterError(f"`{' '.join(cmd)}` failed (exit {done.returncode}):\n{tail}")
    finally:
        if ours:
            policy.unlink(missing_ok=True)
    if missing_programs():
        raise ClusterError(f"installed {' '.join(PACKAGES)} but {', '.join(missing_programs())} still missing")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _sbin(name: str) -> str:
    return shutil.which(name) or str(Path("/usr/sbin", name))


class Cluster:
    """`with Cluster() as c:` starts the daemons (accounting on unless accounting=False) and stops them."""

    def __init__(self, accounting: bool = True, cpus: int | None = None, keep: bool = False, log=print) -> None:
        self.accounting = accounting
        self.cpus = cpus or max(os.cpu_count() or 1, 4)  # more slots than cores: the test jobs mostly wait
        self.keep = keep
        self.log = log
        self.dir = Path(tempfile.mkdtemp(prefix="kvbench-slurm-"))
        self.etc = self.dir / "etc"
        self.host = socket.gethostname().split(".")[0]
        self.procs: dict[str, subprocess.Popen] = {}
        self.munge_socket = self.dir / "munge" / "munge.socket"
        self.db_socket = self.dir / "mysql.sock"
        self.ports = {name: _free_port() for name in ("ctld", "slurmd", "dbd", "mysql")}

    # ------------------------------------------------------------------------------------------- lifecycle

    def __enter__(self) -> "Cluster":
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def env(self) -> dict[str, str]:
        """The environment for SLURM clients (sbatch, squeue, sacct, submitit) to reach this cluster."""
        return {**os.environ, "SLURM_CONF": str(self.etc / "slurm.conf")}

    def start(self) -> None:
        for sub in ("etc", "munge", "state", "spool", "log", "run"):
            (self.dir / sub).mkdir(mode=0o700, parents=True, exist_ok=True)
        self.log(f"cluster folder: {self.dir}")
        self._start_munge()
        if self.accounting:
            self._start_mariadb()
        self._write_slurm_conf()
        if self.accounting:
            self._start_slurmdbd()
        self._spawn("slurmctld", [_sbin("slurmctld"), "-D", "-f", str(self.etc / "slurm.conf")])
        self._wait("slurmctld answers", lambda: self.run(["scontrol", "ping"], check=False).stdout.count("UP") > 0)
        self._spawn("slurmd", [_sbin("slurmd"), "-D", "-f", str(self.etc / "slurm.conf"), "-N", self.host])
        self._wait("the node is idle", self._node_idle, timeout=60)

    def stop(self) -> None:
        """Cancel every job, then end the daemons this object started (last started first), by PID."""
        if "slurmctld" in self.procs and self.procs["slurmctld"].poll() is None:
            self.run(["scancel", "--full", "--user", "root"], check=False)
            deadline = time.time() + 30
            while time.time() < deadline and self.run(["squeue", "-h"], check=False).stdout.strip():
                time.sleep(1)
        for name, proc in reversed(list(self.procs.items())):
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(timeout=20)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait(timeout=10)
            self.log(f"stopped {name} (pid {proc.pid}, exit {proc.returncode})")
        self.procs.clear()
        if not self.keep:
            shutil.rmtree(self.dir, ignore_errors=True)

    def alive(self) -> list[str]:
        return [f"{n} (pid {p.pid})" for n, p in self.procs.items() if p.poll() is None]

    # ------------------------------------------------------------------------------------------- helpers

    def run(self, cmd: list[str], check: bool = True, **kw) -> subprocess.CompletedProcess:
        done = subprocess.run(cmd, env=self.env(), capture_output=True, text=True, **kw)
        if check and done.returncode != 0:
            raise ClusterError(f"`{' '.join(cmd)}` failed (exit {done.returncode}): {done.stderr.strip()[-500:]}")
        return done

    def _spawn(self, name: str, cmd: list[str]) -> None:
        out = open(self.dir / "log" / f"{name}.out", "w")
        self.procs[name] = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=self.env(),
                                            start_new_session=True)
        self.log(f"started {name} (pid {self.procs[name].pid})")

    def _wait(self, what: str, ready, timeout: float = 30) -> None:
        deadline = time.time() + timeout
        while time.time() < deadline:
            dead = [n for n, p in self.procs.items() if p.poll() is not None]
            if dead:
                raise ClusterError(f"{dead[0]} exited (status {self.procs[dead[0]].returncode}) while waiting "
                                   f"until {what}; its log:\n{self._tail(dead[0])}")
            try:
                if ready():
                    return
            except (OSError, subprocess.SubprocessError):
                pass
            time.sleep(0.5)
        raise ClusterError(f"timed out after {timeout:.0f} s waiting until {what}; logs:\n"
                           + "\n".join(self._tail(n) for n in self.procs))

    def _tail(self, name: str, lines: int = 15) -> str:
        logs = [self.dir / "log" / f"{name}.out", self.dir / "log" / f"{name}.log"]
        text = "\n".join(p.read_text(errors="replace") for p in logs if p.exists())
        return f"--- {name}\n" + "\n".join(text.strip().splitlines()[-lines:])

    def _node_idle(self) -> bool:
        state = self.run(["sinfo", "-h", "-N", "-o", "%t"], check=False).stdout.split()
        return bool(state) and all(s.rstrip("*") in ("idle", "mix", "alloc") for s in state)

    # ------------------------------------------------------------------------------------------- daemons

    def _start_munge(self) -> None:
        key = self.dir / "munge" / "munge.key"
        key.write_bytes(os.urandom(1024))
        key.chmod(0o400)
        self._spawn("munged", [_sbin("munged"), "--foreground", "--force", f"--key-file={key}",
                               f"--socket={self.munge_socket}", f"--pid-file={self.dir / 'run' / 'munged.pid'}",
                               f"--seed-file={self.dir / 'munge' / 'seed'}",
                               f"--log-file={self.dir / 'log' / 'munged.log'}"])

        def works() -> bool:
            enc = subprocess.run(["munge", f"--socket={self.munge_socket}", "-n"], capture_output=True)
            dec = subprocess.run(["unmunge", f"--socket={self.munge_socket}"], input=enc.stdout,
                                 capture_output=True)
            return enc.returncode == 0 and dec.returncode == 0
        self._wait("munge encodes and decodes a credential", works)

    def _start_mariadb(self) -> None:
        data = self.dir / "mysql"
        init = subprocess.run(["mariadb-install-db", "--no-defaults", f"--datadir={data}", "--user=root",
                               "--auth-root-authentication-method=socket", "--skip-test-db"],
                              capture_output=True, text=True)
        if init.returncode != 0:
            raise ClusterError(f"mariadb-install-db failed: {init.stderr.strip()[-800:]}")
        self._spawn("mariadbd", [_sbin("mariadbd"), "--no-defaults", f"--datadir={data}", "--user=root",
                                 f"--socket={self.db_socket}", f"--port={self.ports['mysql']}",
                                 "--bind-address=127.0.0.1", f"--pid-file={self.dir / 'run' / 'mariadb.pid'}",
                                 f"--log-error={self.dir / 'log' / 'mariadbd.log'}",
                                 "--innodb-buffer-pool-size=64M"])
        sql = ("CREATE USER 'slurm'@'127.0.0.1' IDENTIFIED BY 'kvbench';"
               "GRANT ALL ON slurm_acct_db.* TO 'slurm'@'127.0.0.1'; FLUSH PRIVILEGES;")
        self._wait("MariaDB accepts connections",
                   lambda: subprocess.run(["mariadb", "--no-defaults", f"--socket={self.db_socket}", "-u", "root",
                                           "-e", "SELECT 1"], capture_output=True).returncode == 0, timeout=60)
        done = subprocess.run(["mariadb", "--no-defaults", f"--socket={self.db_socket}", "-u", "root", "-e", sql],
                              capture_output=True, text=True)
        if done.returncode != 0:
            raise ClusterError(f"cannot create the accounting database user: {done.stderr.strip()}")

    def _start_slurmdbd(self) -> None:
        conf = self.etc / "slurmdbd.conf"  # slurmdbd reads it next to $SLURM_CONF; it must be 0600
        conf.write_text("\n".join([
            "AuthType=auth/munge", f"AuthInfo=socket={self.munge_socket}",
            "DbdHost=localhost", "DbdAddr=127.0.0.1", f"DbdPort={self.ports['dbd']}", "SlurmUser=root",
            f"PidFile={self.dir / 'run' / 'slurmdbd.pid'}", f"LogFile={self.dir / 'log' / 'slurmdbd.log'}",
            "DebugLevel=info", "StorageType=accounting_storage/mysql", "StorageHost=127.0.0.1",
            f"StoragePort={self.ports['mysql']}", "StorageUser=slurm", "StoragePass=kvbench",
            "StorageLoc=slurm_acct_db", ""]))
        conf.chmod(0o600)
        self._spawn("slurmdbd", [_sbin("slurmdbd"), "-D"])
        self._wait("slurmdbd accepts connections",
                   lambda: self.run(["sacctmgr", "-n", "list", "cluster"], check=False, timeout=20).returncode == 0,
                   timeout=60)
        if "kvbench" not in self.run(["sacctmgr", "-n", "-P", "list", "cluster", "format=cluster"]).stdout.split():
            self.run(["sacctmgr", "-i", "add", "cluster", "kvbench"])

    def _write_slurm_conf(self) -> None:
        memory = int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**20 * 0.9)
        lines = [
            "ClusterName=kvbench", f"SlurmctldHost={self.host}(127.0.0.1)",
            f"SlurmctldPort={self.ports['ctld']}", f"SlurmdPort={self.ports['slurmd']}",
            "SlurmUser=root", "SlurmdUser=root",
            "AuthType=auth/munge", f"AuthInfo=socket={self.munge_socket}",
            f"StateSaveLocation={self.dir / 'state'}", f"SlurmdSpoolDir={self.dir / 'spool'}",
            f"SlurmctldPidFile={self.dir / 'run' / 'slurmctld.pid'}",
            f"SlurmdPidFile={self.dir / 'run' / 'slurmd.pid'}",
            f"SlurmctldLogFile={self.dir / 'log' / 'slurmctld.log'}",
            f"SlurmdLogFile={self.dir / 'log' / 'slurmd.log'}",
            # No cgroups (containers rarely delegate them): processes tracked by parentage, no CPU binding.
            "ProctrackType=proctrack/linuxproc", "TaskPlugin=task/none", "JobAcctGatherType=jobacct_gather/none",
            "MpiDefault=none", "SwitchType=switch/none", "SchedulerType=sched/backfill",
            "SelectType=select/cons_tres", "SelectTypeParameters=CR_CPU_Memory", "DefMemPerCPU=1024",
            "ReturnToService=2", "SlurmdParameters=config_overrides", "JobRequeue=1",
            "MinJobAge=60", "KillWait=10", "SchedulerParameters=sched_interval=2",
            "SlurmctldTimeout=30", "SlurmdTimeout=60", "InactiveLimit=0", "Waittime=0",
            "JobCompType=jobcomp/none",
        ]
        if self.accounting:
            lines += ["AccountingStorageType=accounting_storage/slurmdbd", "AccountingStorageHost=localhost",
                      f"AccountingStoragePort={self.ports['dbd']}",
                      # the munge socket for talking to slurmdbd (AuthInfo covers the cluster's own traffic)
                      f"AccountingStoragePass={self.munge_socket}"]
        else:
            lines += ["AccountingStorageType=accounting_storage/none"]
        lines += [f"NodeName={self.host} NodeAddr=127.0.0.1 CPUs={self.cpus} RealMemory={memory} State=UNKNOWN",
                  "PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP", ""]
        (self.etc / "slurm.conf").write_text("\n".join(lines))
        (self.etc / "cgroup.conf").write_text("CgroupPlugin=autodetect\nIgnoreSystemd=yes\n")
