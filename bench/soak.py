"""Soak: N scans through two Celery workers on a private Redis and PostgreSQL while faults are injected.

The archive is N files in nested class folders: hard links of the real scans of
../shared/data/brain-tumor-mri/Training (repeated when N exceeds them, so many scans share content),
a sprinkling of broken files (zero bytes, truncated JPEGs, text named .jpg) and one poison scan.

Faults, in turn, each bounded in count and time:
  1. SIGKILL one worker in the middle of a batch (seen in the database: a live lease with attempts > 0),
     then start it again; its batch comes back by visibility-timeout redelivery.
  2. Restart Redis with persistence off: every queued and unacknowledged message is gone, and the way back
     is the database (`jobs.lifecycle.wait`, i.e. `submit --wait`, reconciles with `resume`).
  3. Stop PostgreSQL for --pg-down seconds, then start it again: workers retry with backoff; one worker is
     restarted while it is down and must come up and wait.
  4. All along: the poison scan kills the process that opens it, every time (a fanotify permission watch on
     that one file, in this script; production code is unchanged). It must end quarantined after
     BRAINSCAN_MAX_ATTEMPTS with that reason while the rest of its batch completes.

Prints ONE JSON line: scans, results, failures by reason, duplicates and lost (both must be 0), wall time,
scans/s, each worker's pool-process RSS at start and end, and what each fault did.

Usage: python bench/soak.py [--scans 20000] [--pg-down 30] [--logs DIR]
Needs the Training folder, redis-server, PostgreSQL server binaries (/usr/lib/postgresql/*/bin) and Linux
fanotify (root). Never touches the machine's Redis or PostgreSQL: both are private instances on their own
ports (first free from 6390 and 5440) in a temporary folder, removed at the end.
"""
from __future__ import annotations

import argparse
import ctypes
import glob
import json
import os
import random
import select
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
TRAINING = ROOT.parent / "shared" / "data" / "brain-tumor-mri" / "Training"
QUEUE = "soak"


def log(msg: str) -> None:
    print(f"[soak {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def free_port(start: int) -> int:
    """The first port from `start` that nobody listens on at 127.0.0.1."""
    for port in range(start, start + 100):
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) != 0:
                return port
    raise RuntimeError(f"no free port in {start}..{start + 99}")


# --- the archive ----------------------------------------------------------------------------------------

BROKEN_KINDS = {
    "zero": "empty file (0 bytes)",
    "truncated": "corrupt JPEG",
    "text": "not an image",
}


def build_archive(dest: Path, n: int, seed: int = 7) -> dict:
    """n files under dest: real scans (hard links), broken files and one poison scan. Returns the manifest."""
    from PIL import Image

    sources = sorted(TRAINING.glob("*/*.jpg"))
    if not sources:
        raise RuntimeError(f"{TRAINING}: no scans (the shared data set is needed)")
    rng = random.Random(seed)
    n_broken = max(3, n // 250)
    n_links = n - n_broken - 1
    order = sources[:: max(1, len(sources) // n_links)][:n_links] if n_links < len(sources) else sources
    links = []
    for i in range(n_links):
        src = order[i % len(order)]
        k = i % len(order)
        rel = f"{src.parent.name}/r{i // len(order):02d}/b{k // 100:03d}/{src.name}"
        links.append(rel)
        target = dest / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        os.link(src, target)
    broken = {}
    for j in range(n_broken):
        kind = list(BROKEN_KINDS)[j % len(BROKEN_KINDS)]
        near = Path(links[rng.randrange(len(links))]).parent
        rel = f"{near}/broken-{kind}-{j:03d}.jpg"
        if kind == "zero":
            data = b""
        elif kind == "truncated":
            whole = (TRAINING / Path(links[rng.randrange(len(links))]).parts[0]).glob("*.jpg")
            data = next(iter(sorted(whole)[j:])).read_bytes()
            data = data[: len(data) // 3]
        else:
            data = b"patient notes, not a scan\n" * 8
        (dest / rel).write_bytes(data)
        broken[rel] = kind
    # The poison: real content of its own (a PNG re-encoding, its own inode), early in path order.
    src = order[min(len(order) - 1, 150)]
    poison = f"{src.parent.name}/r00/b001/poison-{src.stem}.png"
    (dest / poison).parent.mkdir(parents=True, exist_ok=True)
    with Image.open(src) as im:
        im.convert("L").save(dest / poison)
    return {"links": len(links), "distinct_sources": len(order), "broken": broken, "poison": poison}


# --- private services -----------------------------------------------------------------------------------


class PrivateRedis:
    """redis-server on its own port with no persistence at all: a restart loses every message."""

    def __init__(self, folder: Path, port: int):
        self.folder, self.port = folder, port
        self.folder.mkdir(parents=True, exist_ok=True)
        self.proc = None
        self.url = f"redis://127.0.0.1:{port}/0"

    def start(self) -> None:
        import redis

        self.proc = subprocess.Popen(
            ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
             "--dir", str(self.folder), "--logfile", str(self.folder / "redis.log")],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        deadline = time.time() + 20
        while time.time() < deadline:
            try:
                redis.Redis(port=self.port, socket_connect_timeout=1).ping()
                return
            except redis.RedisError:
                time.sleep(0.1)
        raise RuntimeError(f"private redis on {self.port} did not start; see {self.folder / 'redis.log'}")

    def client(self):
        import redis

        return redis.Redis(port=self.port, socket_connect_timeout=2, socket_timeout=5)

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()  # SIGTERM; with --save "" nothing is written
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


class PrivatePostgres:
    """A throwaway cluster (initdb) on its own port, socket in its folder, run as the postgres OS user."""

    def __init__(self, folder: Path, port: int):
        bins = sorted(glob.glob("/usr/lib/postgresql/*/bin"), key=lambda p: int(Path(p).parent.name))
        if not bins:
            raise RuntimeError("PostgreSQL server binaries not found under /usr/lib/postgresql/*/bin")
        self.bin = Path(bins[-1])
        self.folder, self.port = folder, port
        self.data = folder / "data"
        self.url = f"postgresql://postgres@127.0.0.1:{port}/brainscan"

    def _run(self, *args: str, timeout: float = 120) -> None:
        cmd = [str(self.bin / args[0]), *args[1:]]
        if os.geteuid() == 0:  # initdb refuses root: run the cluster as the postgres user
            cmd = ["runuser", "-u", "postgres", "--", *cmd]
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
        if done.returncode:
            raise RuntimeError(f"{' '.join(args[:1])} failed ({done.returncode}): {done.stderr[-2000:]}")

    def init(self) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        if os.geteuid() == 0:
            import pwd

            pw = pwd.getpwnam("postgres")
            os.chown(self.folder, pw.pw_uid, pw.pw_gid)
        self._run("initdb", "-D", str(self.data), "-U", "postgres", "-A", "trust", "-E", "UTF8", "--no-sync")
        self.start()
        from sqlalchemy import create_engine, text

        engine = create_engine(self.url.rsplit("/", 1)[0] + "/postgres", isolation_level="AUTOCOMMIT")
        with engine.connect() as conn:
            conn.execute(text("CREATE DATABASE brainscan"))
        engine.dispose()

    def start(self) -> None:
        opts = (f"-p {self.port} -k {self.folder} -c listen_addresses=127.0.0.1 -c fsync=off "
                "-c full_page_writes=off -c max_connections=200")
        self._run("pg_ctl", "-D", str(self.data), "-l", str(self.folder / "postgres.log"), "-w", "-t", "60",
                  "-o", opts, "start")

    def stop(self) -> None:
        if (self.data / "postmaster.pid").exists():
            self._run("pg_ctl", "-D", str(self.data), "-m", "fast", "-w", "-t", "60", "stop")


# --- the poison: fanotify permission events on one file -------------------------------------------------


class PoisonWatch(threading.Thread):
    """SIGKILLs any worker pool process that opens the poison file, before the open returns.

    fanotify FAN_OPEN_PERM holds the opener until this thread answers, so the poison is never read by a
    worker: the process dies as if the decoder had crashed on it. Other processes may open it freely.
    """

    FAN_CLOEXEC, FAN_CLASS_CONTENT, FAN_MARK_ADD, FAN_OPEN_PERM = 0x1, 0x4, 0x1, 0x10000
    FAN_ALLOW, FAN_DENY = 0x1, 0x2
    AT_FDCWD = -100

    def __init__(self, path: Path, is_worker_process):
        super().__init__(daemon=True, name="poison-watch")
        libc = ctypes.CDLL(None, use_errno=True)
        libc.fanotify_init.argtypes = [ctypes.c_uint, ctypes.c_uint]
        libc.fanotify_mark.argtypes = [ctypes.c_int, ctypes.c_uint, ctypes.c_uint64, ctypes.c_int,
                                       ctypes.c_char_p]
        self.fd = libc.fanotify_init(self.FAN_CLASS_CONTENT | self.FAN_CLOEXEC, os.O_RDONLY)
        if self.fd < 0:
            raise RuntimeError(f"fanotify_init: {os.strerror(ctypes.get_errno())} (the poison needs root on Linux)")
        if libc.fanotify_mark(self.fd, self.FAN_MARK_ADD, self.FAN_OPEN_PERM, self.AT_FDCWD,
                              str(path).encode()) != 0:
            raise RuntimeError(f"fanotify_mark {path}: {os.strerror(ctypes.get_errno())}")
        self.is_worker_process = is_worker_process
        self.kills: list[dict] = []
        self.stopping = threading.Event()
        self.started_at = time.monotonic()

    def run(self) -> None:
        while not self.stopping.is_set():
            ready, _, _ = select.select([self.fd], [], [], 0.5)
            if not ready:
                continue
            buf = os.read(self.fd, 4096)
            offset = 0
            while offset + 24 <= len(buf):
                event_len, _vers, _res, _meta_len, _mask, efd, pid = struct.unpack_from("IBBHQii", buf, offset)
                offset += event_len or 24
                answer = self.FAN_ALLOW
                if efd >= 0 and self.is_worker_process(pid):
                    try:
                        os.kill(pid, signal.SIGKILL)
                        self.kills.append({"pid": pid, "at_s": round(time.monotonic() - self.started_at, 1)})
                    except ProcessLookupError:
                        pass
                    answer = self.FAN_DENY
                if efd >= 0:
                    os.write(self.fd, struct.pack("iI", efd, answer))
                    os.close(efd)

    def stop(self) -> None:
        self.stopping.set()
        self.join(timeout=5)
        os.close(self.fd)


# --- workers --------------------------------------------------------------------------------------------


def children(pid: int) -> list[int]:
    """Processes whose parent is pid (the prefork pool of a worker)."""
    out = []
    for stat in glob.glob("/proc/[0-9]*/stat"):
        try:
            fields = Path(stat).read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            out.append(int(Path(stat).parent.name))
    return out


def rss_mb(pid: int) -> float | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return round(int(line.split()[1]) / 1024, 1)
    except OSError:
        return None
    return None


class Slot:
    """One of the two workers, restarted in place when the fault script kills it."""

    def __init__(self, index: int, env: dict, logs: Path):
        self.index, self.env, self.logs = index, env, logs
        self.worker = None
        self.starts = 0
        self.samples: dict[int, list[tuple[float, float]]] = {}  # pool pid -> [(t, rss)]

    def start(self):
        from tests.services import Worker

        log_file = self.logs / f"worker{self.index}-{self.starts}.log"
        self.starts += 1
        self.worker = Worker(self.env, log_file).wait_ready(timeout=300)
        return self.worker

    def pool(self) -> list[int]:
        return children(self.worker.proc.pid) if self.worker and self.worker.proc.poll() is None else []

    def sample(self, t: float) -> None:
        for pid in self.pool():
            rss = rss_mb(pid)
            if rss is not None:
                self.samples.setdefault(pid, []).append((t, rss))

    def log_text(self) -> str:
        return "".join(p.read_text(errors="replace") for p in sorted(self.logs.glob(f"worker{self.index}-*.log")))


# --- the run --------------------------------------------------------------------------------------------


@contextmanager
def environment(values: dict):
    saved = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


class Soak:
    def __init__(self, args, tmp: Path):
        self.args, self.tmp = args, tmp
        self.logs = Path(args.logs) if args.logs else tmp / "logs"
        self.logs.mkdir(parents=True, exist_ok=True)
        self.redis = PrivateRedis(tmp / "redis", free_port(args.redis_port))
        self.pg = PrivatePostgres(tmp / "pg", free_port(args.pg_port))
        self.faults: list[dict] = []
        self.reconciliations: list[dict] = []
        self.unexpected_exits: list[dict] = []
        self.t0 = time.monotonic()
        self.done_event = threading.Event()
        self.lock = threading.Lock()

    def now(self) -> float:
        return round(time.monotonic() - self.t0, 1)

    # ---- database views, None while the database is down
    def db(self, fn):
        from db.session import session_scope

        try:
            with session_scope(self.settings.database_url) as s:
                return fn(s)
        except Exception as exc:
            from sqlalchemy.exc import DBAPIError

            if not isinstance(exc, DBAPIError):  # a bug here, not the database being down
                log(f"fault-script query failed: {exc!r}")
            return None

    def counts(self):
        from sqlalchemy import case, func, select

        from db.models import Scan

        def q(s):
            row = s.execute(select(
                func.sum(case((Scan.status != "pending", 1), else_=0)),
                func.sum(case((Scan.status == "pending", 1), else_=0)),
            ).where(Scan.job_id == self.job_id)).one()
            return {"finished": int(row[0] or 0), "pending": int(row[1] or 0)}
        return self.db(q)

    def wait_for(self, predicate, timeout: float, poll: float = 0.2):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            value = predicate()
            if value:
                return value
            if self.done_event.is_set():
                return None
            time.sleep(poll)
        return None

    def is_worker_process(self, pid: int) -> bool:
        try:
            ppid = int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            return False
        return any(slot.worker and slot.worker.proc.pid == ppid for slot in self.slots)

    # ---- monitor: RSS samples and unexpected worker exits (a crash loop would show here)
    def monitor(self) -> None:
        while not self.done_event.wait(2.0):
            t = self.now()
            for slot in self.slots:
                with self.lock:
                    w = slot.worker
                    if w is not None and w.proc.poll() is not None and not getattr(w, "killed_on_purpose", False):
                        self.unexpected_exits.append({"slot": slot.index, "rc": w.proc.returncode, "at_s": t})
                        log(f"worker {slot.index} exited by itself ({w.proc.returncode}); starting it again")
                        slot.start()
                slot.sample(t)

    # ---- the faults
    def leased_groups(self):
        from sqlalchemy import func, select

        from db.models import Scan

        def q(s):
            now = s.scalar(select(func.now()))
            rows = s.execute(select(Scan.id, Scan.attempts, Scan.lease_until).where(
                Scan.job_id == self.job_id, Scan.status == "pending", Scan.attempts > 0,
                Scan.lease_until > now)).all()
            groups: dict = {}
            for sid, attempts, lease in rows:
                if sid in self.poison_batch:
                    continue
                groups.setdefault(lease, {})[sid] = attempts
            return groups
        return self.db(q)

    def scan_rows(self, ids):
        from sqlalchemy import select

        from db.models import Scan

        return self.db(lambda s: {r.id: r for r in s.execute(
            select(Scan.id, Scan.status, Scan.attempts, Scan.lease_until).where(Scan.id.in_(list(ids)))).all()})

    def fault_kill(self) -> dict:
        """SIGKILL worker 0 while both workers hold a batch, then start it again."""
        lease = self.args.lease
        for attempt in range(1, 4):
            groups = self.wait_for(lambda: (g := self.leased_groups()) and len(g) >= 2 and g, timeout=90, poll=0.05)
            if not groups:
                return {"fault": "sigkill worker mid-batch", "ran": False, "why": "never saw both workers in a batch"}
            snapshot = {sid: (a, lease_until) for lease_until, ids in groups.items() for sid, a in ids.items()}
            at = self.now()
            with self.lock:
                slot = self.slots[0]
                slot.worker.killed_on_purpose = True
                slot.worker.kill()
                log(f"fault 1: SIGKILLed worker 0 (pid {slot.worker.proc.pid}) with {len(groups)} batches in flight")
                slot.start()
            fault = {"fault": "sigkill worker mid-batch", "ran": True, "tries": attempt, "at_s": at,
                     "restarted_after_s": round(self.now() - at, 1)}
            if self.args.tight:  # on to the next fault; the killed batch is judged at the end
                self.kill_snapshot = snapshot
                return fault
            time.sleep(max(0.0, at + lease + 2 - self.now()))
            rows = self.wait_for(lambda: self.scan_rows(snapshot), timeout=120) or {}
            orphaned = [sid for sid, (a, lease_until) in snapshot.items() if sid in rows and (
                rows[sid].attempts > a or (rows[sid].status == "pending" and rows[sid].lease_until == lease_until))]
            if not orphaned:
                log("fault 1: the killed worker was between batches; again")
                continue
            self.kill_snapshot = snapshot

            def recovered():
                r = self.scan_rows(orphaned)
                return r is not None and all(x.status != "pending" for x in r.values()) and r
            final = self.wait_for(recovered, timeout=self.args.visibility * 3 + 120, poll=0.5)
            fault["recovered_after_s"] = round(self.now() - at, 1) if final else None
            return fault
        return {"fault": "sigkill worker mid-batch", "ran": False, "why": "3 kills, none mid-batch"}

    def killed_batch(self, by_id) -> dict:
        """What became of the scans the killed worker held: claimed again (attempts went up), and how."""
        snapshot = getattr(self, "kill_snapshot", None)
        if not snapshot:
            return {}
        orphaned = [by_id[sid] for sid, (a, _) in snapshot.items() if by_id[sid].attempts > a]
        restart = getattr(self, "redis_restart_wall", None)
        last = max((r.finished_at for r in orphaned if r.finished_at), default=None)
        if last is not None and last.tzinfo is None:
            last = last.replace(tzinfo=timezone.utc)
        how = ("redelivered after the visibility timeout" if restart is None or (last and last < restart)
               else "its message was lost in the Redis restart: re-enqueued by reconciliation")
        return {"scans_in_killed_batch": len(orphaned), "their_status": dict(Counter(r.status for r in orphaned)),
                "their_attempts": dict(Counter(r.attempts for r in orphaned)), "recovered_by": how}

    def fault_redis(self) -> dict:
        c = self.wait_for(self.counts, timeout=60)
        if not c or c["pending"] < 2 * self.settings.batch_size:
            return {"fault": "redis restart (no persistence)", "ran": False, "why": "too little work left",
                    "counts": c}
        r = self.redis.client()
        try:
            queued, unacked = r.llen(QUEUE), r.hlen("unacked")
        except Exception:
            queued = unacked = None
        at = self.now()
        reconciled_before = len(self.reconciliations)
        self.redis.stop()
        self.redis_restart_wall = datetime.now(timezone.utc)
        time.sleep(1)
        self.redis.start()
        log(f"fault 2: restarted redis without persistence: {queued} queued + {unacked} unacked messages lost")
        # Reconnecting workers recreate kombu's binding keys at once; what matters is that no message survived.
        after_client = self.redis.client()
        left_in_redis = after_client.llen(QUEUE) + after_client.hlen("unacked")

        def resumed():  # new work came from re-enqueued messages: a reconciliation happened and progressed
            c2 = self.counts()
            return (len(self.reconciliations) > reconciled_before and c2 and c2["finished"] > c["finished"]
                    + self.settings.batch_size * 2 and c2) or (c2 and c2["pending"] == 0 and c2)
        after = self.wait_for(resumed, timeout=self.args.stall + 240, poll=0.5)
        return {"fault": "redis restart (no persistence)", "ran": True, "at_s": at,
                "messages_lost": {"queued": queued, "unacked": unacked}, "messages_after_restart": left_in_redis,
                "pending_at_restart": c["pending"],
                "reconciliations": self.reconciliations[reconciled_before:],
                "recovered": bool(after), "recovered_after_s": round(self.now() - at, 1) if after else None}

    def fault_postgres(self) -> dict:
        c = self.wait_for(self.counts, timeout=60)
        if not c or c["pending"] < 2 * self.settings.batch_size:
            return {"fault": "postgres down", "ran": False, "why": "too little work left", "counts": c}
        retries_before = sum(s.log_text().count("Retry in") for s in self.slots)
        at = self.now()
        self.pg.stop()
        log(f"fault 3: stopped postgres for {self.args.pg_down}s with {c['pending']} scans pending")
        time.sleep(min(3.0, self.args.pg_down / 4))
        # A worker that (re)starts while the database is down must come up and wait, not crash.
        t_restart = self.now()
        with self.lock:
            slot = self.slots[1]
            slot.worker.killed_on_purpose = True
            slot.worker.stop()
            slot.start()
        restarted = {"worker": 1, "ready_after_s": round(self.now() - t_restart, 1),
                     "database_still_down": self.now() - at < self.args.pg_down}
        log(f"fault 3: worker 1 restarted while postgres is down: {restarted}")
        time.sleep(max(0.0, at + self.args.pg_down - self.now()))
        alive = [s.worker.proc.poll() is None for s in self.slots]
        self.pg.start()
        back = self.now()
        log("fault 3: postgres started again")
        after = self.wait_for(lambda: (c2 := self.counts()) and (
            c2["finished"] > c["finished"] + self.settings.batch_size or c2["pending"] == 0) and c2,
            timeout=300, poll=0.5)
        retries = sum(s.log_text().count("Retry in") for s in self.slots) - retries_before
        return {"fault": "postgres down", "ran": True, "at_s": at, "down_s": round(back - at, 1),
                "pending_at_stop": c["pending"], "workers_alive_while_down": alive,
                "worker_restarted_while_down": restarted,
                "task_retries_logged": retries,
                "recovered": bool(after),
                "progress_again_after_start_s": round(self.now() - back, 1) if after else None}

    def fault_script(self) -> None:
        try:
            warm = max(2 * self.settings.batch_size, self.total // 25)
            self.wait_for(lambda: (c := self.counts()) and c["finished"] >= warm, timeout=600, poll=0.5)
            for name, fault in (("sigkill worker mid-batch", self.fault_kill),
                                ("redis restart (no persistence)", self.fault_redis),
                                ("postgres down", self.fault_postgres)):
                if self.done_event.is_set():
                    self.faults.append({"fault": name, "ran": False, "why": "job already complete"})
                    continue
                self.faults.append(fault())
                log(f"fault done: {json.dumps(self.faults[-1])}")
        except Exception as exc:  # a broken fault script must show in the result, not hang the run
            self.faults.append({"fault": "script", "error": repr(exc)})
            log(f"fault script failed: {exc!r}")

    # ---- main
    def run(self) -> dict:
        import jobs.lifecycle as lifecycle
        from config import load_settings
        from jobs.lifecycle import enqueue_job, new_job, wait
        from jobs.submission import batches, pending_ids

        args = self.args
        model = Path(args.model).resolve()
        archive = self.tmp / "archive"
        manifest = build_archive(archive, args.scans, seed=args.seed)
        log(f"archive: {args.scans} files ({manifest['links']} links of {manifest['distinct_sources']} scans, "
            f"{len(manifest['broken'])} broken, 1 poison) in {archive}")
        self.redis.start()
        self.pg.init()
        log(f"private redis :{self.redis.port}, postgres :{self.pg.port} in {self.tmp}")
        env_values = {
            "DATABASE_URL": self.pg.url, "BROKER_URL": self.redis.url, "BRAINSCAN_MODEL": str(model),
            "BRAINSCAN_QUEUE": QUEUE, "BRAINSCAN_VAR": str(self.tmp / "var"),
            "BRAINSCAN_LEASE_SECONDS": str(args.lease), "BRAINSCAN_VISIBILITY_TIMEOUT": str(args.visibility),
            "BRAINSCAN_MAX_ATTEMPTS": str(args.max_attempts), "BRAINSCAN_BATCH_SIZE": str(args.batch_size),
        }
        with environment(env_values):
            self.settings = settings = load_settings()
            worker_env = {**os.environ, "PYTHONPATH": str(ROOT)}
            lifecycle.open_database(settings)
            self.slots = [Slot(i, worker_env, self.logs) for i in range(2)]
            for slot in self.slots:
                slot.start()
            log("two workers ready")

            t_submit = time.monotonic()
            self.job_id = job_id = new_job(settings, archive)
            submit_s = time.monotonic() - t_submit
            from sqlalchemy import select

            from db.models import Scan
            from db.session import session_scope

            with session_scope(settings.database_url) as s:
                ids = pending_ids(s, job_id, respect_leases=False)
                path_of = dict(s.execute(select(Scan.path, Scan.id).where(Scan.job_id == job_id)).all())
            self.total = len(ids)
            poison_id = path_of[manifest["poison"]]
            self.poison_batch = set(next(b for b in batches(ids, settings.batch_size) if poison_id in b))
            watch = PoisonWatch(archive / manifest["poison"], self.is_worker_process)
            watch.start()

            real_resume = lifecycle.resume

            def counting_resume(settings_, session, job):
                sent = real_resume(settings_, session, job)
                self.reconciliations.append({"at_s": self.now(), "scans_reenqueued": sent})
                log(f"wait reconciled: resume re-enqueued {sent} scans")
                return sent
            lifecycle.resume = counting_resume
            monitor = threading.Thread(target=self.monitor, daemon=True, name="monitor")
            faults = threading.Thread(target=self.fault_script, daemon=True, name="faults")
            try:
                self.t0 = t_enqueue = time.monotonic()
                enqueue_job(settings, job_id)
                monitor.start()
                faults.start()
                p = wait(settings, job_id, poll=0.5, stall_seconds=args.stall, timeout=args.timeout)
                wall = time.monotonic() - t_enqueue
                self.done_event.set()
                faults.join(timeout=600)
                monitor.join(timeout=10)
            finally:
                lifecycle.resume = real_resume
                self.done_event.set()
                watch.stop()
            t_end = self.now()
            for slot in self.slots:
                slot.sample(t_end)
            result = self.summary(manifest, p, wall, submit_s, poison_id, watch)
            for slot in self.slots:
                slot.worker.stop()
            from db.session import dispose_engines, get_engine

            get_engine(settings.database_url).dispose()
            dispose_engines()
        return result

    def summary(self, manifest, p, wall, submit_s, poison_id, watch) -> dict:
        from sqlalchemy import func, select

        from db.models import Result, Scan
        from db.session import session_scope

        url = self.settings.database_url
        with session_scope(url) as s:
            scans = s.execute(select(Scan.id, Scan.path, Scan.sha256, Scan.status, Scan.error, Scan.result_id,
                                     Scan.from_cache, Scan.attempts, Scan.finished_at)
                              .where(Scan.job_id == self.job_id)).all()
            model_sha = s.scalar(select(Result.model_sha256).limit(1))
            per_content = dict(s.execute(
                select(Result.sha256, func.count()).where(Result.sha256.in_({r.sha256 for r in scans}))
                .group_by(Result.sha256, Result.model_sha256)).all())
            dup_groups = s.execute(select(Result.sha256, Result.model_sha256, func.count())
                                   .group_by(Result.sha256, Result.model_sha256).having(func.count() > 1)).all()
        by_path = {r.path: r for r in scans}
        for fault in self.faults:
            if fault.get("fault") == "sigkill worker mid-batch" and fault.get("ran"):
                fault.update(self.killed_batch({r.id: r for r in scans}))
        failed = [r for r in scans if r.status == "failed"]
        reasons = Counter((r.error or "NO REASON").split(":")[0] for r in failed)
        expected_fail = set(manifest["broken"]) | {manifest["poison"]}
        broken_ok = {kind: 0 for kind in BROKEN_KINDS}
        broken_wrong = []
        for path, kind in manifest["broken"].items():
            r = by_path[path]
            if r.status == "failed" and (r.error or "").startswith(BROKEN_KINDS[kind]):
                broken_ok[kind] += 1
            else:
                broken_wrong.append({"path": path, "status": r.status, "error": r.error})
        unexpected = [{"path": r.path, "error": r.error, "attempts": r.attempts}
                      for r in failed if r.path not in expected_fail]
        poison = by_path[manifest["poison"]]
        batch_rows = [r for r in scans if r.id in self.poison_batch and r.id != poison_id]
        lost = sum(1 for r in scans if r.status not in ("done", "failed")
                   or (r.status == "done" and r.result_id is None) or (r.status == "failed" and not r.error))
        scans_multi = sum(1 for r in scans if r.status == "done" and per_content.get(r.sha256, 0) > 1)
        rss = []
        for slot in self.slots:
            # Per pool process: "warm" is its peak between 20 and 40 s after it appeared (model loaded, first
            # batches done; a peak because RSS swings by 200 MB between batches as buffers are freed and a
            # single sample could land in a dip), "last" its last sample. The worker's start is the warm RSS
            # of its first pool process that lived 20 s, its end the last sample of its last pool process.
            lived = {}
            for pid, seq in slot.samples.items():
                warm = max((v for t, v in seq if 20 <= t - seq[0][0] <= 40), default=None)
                lived[pid] = {"warm_mb": warm, "last_mb": seq[-1][1], "max_mb": max(v for _, v in seq),
                              "lived_s": round(seq[-1][0] - seq[0][0], 1),
                              "every_fifth_mb": [seq[min(len(seq) - 1, len(seq) * k // 5)][1] for k in range(6)]}
            first = next((pid for pid, x in lived.items() if x["warm_mb"] is not None), None)
            last = next(reversed(lived), None) if lived else None
            rss.append({"worker": slot.index, "starts": slot.starts, "pool_processes": len(lived),
                        "start_pid": first, "rss_start_mb": lived[first]["warm_mb"] if first else None,
                        "end_pid": last, "rss_end_mb": lived[last]["last_mb"] if last else None,
                        "long_lived": {str(pid): x for pid, x in lived.items() if x["lived_s"] >= 60}})
        logs = "".join(slot.log_text() for slot in self.slots)
        return {
            "submitted": len(scans), "model": Path(self.args.model).name, "model_sha256": (model_sha or "")[:12],
            "submit_s": round(submit_s, 1),
            "results": sum(1 for r in scans if r.status == "done" and r.result_id is not None),
            "computed": len(per_content), "from_cache": sum(1 for r in scans if r.from_cache),
            "failed": len(failed), "failed_by_reason": dict(reasons),
            "duplicates": len(dup_groups) + scans_multi, "lost": lost,
            "job_status": p.status, "wall_s": round(wall, 1), "scans_per_s": round(len(scans) / wall, 2),
            "broken_failed_with_reason": broken_ok, "broken_wrong": broken_wrong,
            "unexpected_failures": len(unexpected), "unexpected_examples": unexpected[:5],
            "poison": {"path": manifest["poison"], "status": poison.status, "error": poison.error,
                       "attempts": poison.attempts, "kills": len(watch.kills),
                       "rest_of_batch": dict(Counter(r.status for r in batch_rows))},
            "faults": self.faults, "reconciliations": self.reconciliations,
            "unexpected_worker_exits": self.unexpected_exits,
            "worker_log": {"task_retries": logs.count("Retry in"), "worker_lost": logs.count("WorkerLostError"),
                           "tracebacks": logs.count("Traceback")},
            "rss": rss, "settings": {"lease_s": self.args.lease, "visibility_timeout_s": self.args.visibility,
                                     "max_attempts": self.args.max_attempts, "batch_size": self.args.batch_size,
                                     "stall_s": self.args.stall, "pg_down_s": self.args.pg_down},
        }


def parse(argv=None):
    import config

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scans", type=int, default=20000, help="files in the archive (default 20000)")
    parser.add_argument("--model", default=os.environ.get("BRAINSCAN_MODEL") or str(config.DEFAULT_MODEL))
    parser.add_argument("--pg-down", type=float, default=30, help="seconds PostgreSQL stays down (default 30)")
    parser.add_argument("--lease", type=int, default=15, help="BRAINSCAN_LEASE_SECONDS of the workers")
    parser.add_argument("--visibility", type=int, default=20,
                        help="BRAINSCAN_VISIBILITY_TIMEOUT of the workers; above every retry countdown (lease, 16 s)")
    parser.add_argument("--stall", type=float, default=20, help="wait(): seconds without progress before reconciling")
    parser.add_argument("--max-attempts", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--timeout", type=float, default=3 * 3600, help="give up waiting after this many seconds")
    parser.add_argument("--redis-port", type=int, default=6390)
    parser.add_argument("--pg-port", type=int, default=5440)
    parser.add_argument("--tight", action="store_true",
                        help="start each fault once the previous one is over (worker restarted, service back) "
                             "rather than after its recovery, for runs too short to hold them one by one")
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--logs", help="keep worker logs in this folder")
    return parser.parse_args(argv)


def main(argv=None) -> dict:
    args = parse(argv)
    if not Path(args.model).is_file():
        raise SystemExit(f"{args.model}: no model (set BRAINSCAN_MODEL or --model)")
    tmp = Path(tempfile.mkdtemp(prefix="brainscan-soak-"))
    os.chmod(tmp, 0o755)  # the postgres user must reach its folder inside
    soak = Soak(args, tmp)
    try:
        result = soak.run()
    finally:
        for stop in (lambda: [s.worker.stop() for s in getattr(soak, "slots", []) if s.worker],
                     soak.pg.stop, soak.redis.stop):
            try:
                stop()
            except Exception as exc:
                log(f"cleanup: {exc!r}")
        shutil.rmtree(tmp, ignore_errors=True)
    print(json.dumps(result), flush=True)
    return result


if __name__ == "__main__":
    main()
