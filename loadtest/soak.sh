#!/usr/bin/env bash
# Issue 13's soak test: for MINUTES, drive mixed traffic at a `greyhound serve`, kill -9 it at
# random moments (now and then while it starts, often while a snapshot is being written, as
# snapshots run every second) and restart it on the same data directory and ports. After each
# restart, every triplet whitelisted before the last snapshot that the killed life completed
# (and before every earlier one) must still answer `PASS known` to a PEEK.
#
#   loadtest/soak.sh [MINUTES]          (default 30)
#
# Prints one line per life and a summary: cycles, decisions, whitelisted triplets checked, lost
# (must be 0; the exit status is 1 otherwise). SOAK_SEED=N replays the random choices.
#
# Binaries: by default a release build of greyhound and greyhound-loadtest (built here; set
# CARGO_BUILD_JOBS to spare a shared machine). GREYHOUND=PATH runs that server binary instead,
# without building; LOADTEST=PATH the load generator, or LOADTEST= (empty) for the script's own,
# slower, traffic (tests/soak.rs runs it so, on the debug build, for about a minute).
set -euo pipefail
cd "$(dirname "$0")/.."
minutes=${1:-30}
if [ -z "${GREYHOUND:-}" ]; then
    cargo build --release --locked -q -p greyhound -p greyhound-loadtest
    GREYHOUND=target/release/greyhound
    LOADTEST=${LOADTEST-target/release/greyhound-loadtest}
fi
export GREYHOUND LOADTEST="${LOADTEST:-}"
exec python3 - "$minutes" <<'PY'
import os, random, re, shutil, signal, socket, subprocess, sys, tempfile, threading, time
import urllib.request

minutes = float(sys.argv[1])
greyhound, loadtest = os.environ["GREYHOUND"], os.environ.get("LOADTEST", "")
seed = int(os.environ.get("SOAK_SEED") or time.time_ns() % 1_000_000_007)
rng = random.Random(seed)
work = tempfile.mkdtemp(prefix="greyhound-soak-")
data = os.path.join(work, "data")
flags = ["--delay", "1s", "--snapshot-interval", "1s"]
addrs = {"--native": "127.0.0.1:0", "--policy": "127.0.0.1:0", "--metrics": "127.0.0.1:0"}
print(f"soak: {minutes} min, seed {seed}, server {greyhound}, traffic {loadtest or 'own'}",
      flush=True)

def start(kill_after=None):
    """Starts a server; returns it once ready, or None if killed on purpose while starting."""
    log = open(os.path.join(work, "log"), "w+")
    args = [greyhound, "serve", "--data-dir", data, *flags]
    for flag, addr in addrs.items():
        args += [flag, addr]
    p = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                         stderr=log, env={**os.environ, "RUST_LOG": "info"})
    began = time.monotonic()
    while True:
        log.seek(0)
        text = log.read()
        m = re.search(r" ready native=(\S+) policy=(\S+) metrics=(\S+)", text)
        if m:
            addrs.update({"--native": m[1], "--policy": m[2], "--metrics": m[3]})
            return p, text
        if kill_after is not None and time.monotonic() - began >= kill_after:
            p.kill(); p.wait()
            return None
        if p.poll() is not None or time.monotonic() - began > 60:
            p.kill(); p.wait()
            holders = []
            for pid in filter(str.isdigit, os.listdir("/proc")):
                try:
                    fds = os.listdir(f"/proc/{pid}/fd")
                    if any(os.readlink(f"/proc/{pid}/fd/{fd}").startswith(data) for fd in fds):
                        holders.append(open(f"/proc/{pid}/cmdline").read().replace("\0", " "))
                except OSError:
                    pass
            sys.exit(f"soak: the server did not start (exit {p.returncode}); processes with "
                     f"files in the data directory: {holders}\n{text}")
        time.sleep(0.01)

class Conn:
    def __init__(self):
        host, port = addrs["--native"].rsplit(":", 1)
        self.s = socket.create_connection((host, int(port)), timeout=10)
        self.f = self.s.makefile("rb")
    def ask(self, lines):
        self.s.sendall("".join(l + "\n" for l in lines).encode())
        out = []
        for _ in lines:
            line = self.f.readline()
            if not line:
                raise ConnectionError("closed")
            out.append(line.decode().strip())
        return out

def triplet(i):
    return f"172.{16 + i % 16}.{i // 16 % 256}.{i // 4096 % 256} w{i}@soak.example r{i % 101}@rcpt.example"

def metrics():
    with urllib.request.urlopen(f"http://{addrs['--metrics']}/metrics", timeout=5) as r:
        text = r.read().decode()
    def value(pattern):
        return sum(float(m[1]) for m in re.finditer(rf"^{pattern}\S* (\S+)$", text, re.M))
    return value(r"greyhound_decisions_total"), value(r"greyhound_snapshot_last_time_seconds")

def whitelister(first, stop, passed):
    """Whitelists new triplets in batches (CHECK, wait past the delay, CHECK) until stopped or
    the server dies; appends (id, time the PASS was read) to `passed`."""
    i = first[0]
    try:
        c = Conn()
        while not stop.is_set():
            batch = list(range(i, i + 300))
            first[0] = i = i + 300  # never reuse ids, even of a batch cut short
            c.ask([f"CHECK {triplet(j)}" for j in batch])
            time.sleep(1.3)
            answers = c.ask([f"CHECK {triplet(j)}" for j in batch])
            now = time.time()
            passed += [(j, now) for j, a in zip(batch, answers) if a.startswith("PASS")]
    except (OSError, ConnectionError):
        pass

def own_traffic(stop):
    """Mixed traffic without the load generator: new triplets, repeats, PEEKs."""
    n = 0
    try:
        c = Conn()
        while not stop.is_set():
            lines = []
            for _ in range(500):
                n += 1
                k = rng.random()
                t = n if k < 0.5 else rng.randrange(max(1, n))
                verb = "PEEK" if k > 0.9 else "CHECK"
                lines.append(f"{verb} 10.{t % 200}.{t // 200 % 256}.1 m{t}@mix.example r@rcpt.example")
            c.ask(lines)
    except (OSError, ConnectionError):
        pass

must_survive = []   # whitelisted before a snapshot that completed
next_id = [0]
cycles = decisions = lost = early_kills = mid_write = 0
began = time.monotonic()
try:
    while True:
        while rng.random() < 0.15:
            # Killed while starting (loading its snapshot): nothing may be lost either.
            got = start(kill_after=rng.uniform(0, 0.3))
            if got is not None:  # ready before the moment came: killed right after
                got[0].kill()
                got[0].wait()
            early_kills += 1
        server, log = start()
        # The check: every triplet whitelisted before the last completed snapshot.
        c = Conn()
        missing = []
        for k in range(0, len(must_survive), 1000):
            part = must_survive[k:k + 1000]
            missing += [i for i, a in zip(part, c.ask([f"PEEK {triplet(i)}" for i in part]))
                        if a != "PASS known"]
        del c
        lost += len(missing)
        if missing:
            print(f"LOST after restart {cycles}: {len(missing)} triplets, e.g. {missing[:5]}\n{log}",
                  flush=True)
        if time.monotonic() - began >= minutes * 60:
            server.kill(); server.wait()
            break
        cycles += 1
        stop = threading.Event()
        passed = []
        threads = [threading.Thread(target=whitelister, args=(next_id, stop, passed))]
        gen = None
        if loadtest:
            gen = subprocess.Popen(
                [loadtest, "run", "--proto", "native-tcp", "--target", addrs["--native"],
                 "-c", "4", "-p", "32", "--server-delay", "1", "-d", "1h", "-q"],
                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        else:
            threads.append(threading.Thread(target=own_traffic, args=(stop,)))
        for t in threads:
            t.start()
        time.sleep(rng.uniform(1.0, 8.0))
        d, snap = metrics()
        server.kill(); server.wait()  # kill -9
        stop.set()
        if gen:
            gen.kill(); gen.wait()
        for t in threads:
            t.join()
        if any(f.endswith(".tmp") for f in os.listdir(data)):
            mid_write += 1
        decisions += int(d)
        # Whitelisted (its PASS read) before the last completed snapshot of this life began.
        kept = [i for i, t in passed if t < snap]
        must_survive += kept
        print(f"life {cycles}: {int(d)} decisions, {len(passed)} whitelisted, "
              f"{len(kept)} before its last snapshot, {len(must_survive)} to check", flush=True)
finally:
    shutil.rmtree(work, ignore_errors=True)
print(f"soak: {cycles} cycles in {(time.monotonic() - began) / 60:.1f} min (seed {seed}), "
      f"{decisions} decisions, {len(must_survive)} whitelisted triplets checked after each "
      f"restart, {early_kills} kills while starting or just after, {mid_write} kills mid-snapshot, lost {lost}")
sys.exit(1 if lost else 0)
PY
