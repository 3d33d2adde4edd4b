"""Training faults: kill -9 at random moments, SIGTERM and SIGINT (preemption) delivered each way a scheduler or a
terminal sends them, S3 outages, a NAS that turns read-only.

Every run is `shardtrain train CONFIG --nproc-per-node 2` (gloo DDP on CPU, deterministic) of timm's
`test_resnet` at 32 px on a small ImageFolder store: 3 epochs of 6 steps, a checkpoint every 2 steps
uploaded to storage (the moto S3 server, or a local folder as the NAS), an eval every epoch; the
preemption trials with a DataLoader worker per rank. An interrupted run is resumed with `resume: auto`
and must end with the model and optimizer state of the uninterrupted baseline, bit for bit.
`run(work, kills, seed)` returns flat figures (see `run`); `run_preemptions` the preemption trials alone.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import signal
import statistics
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import fsspec
import torch
import yaml

from shards import ConvertOptions, convert
from shards.samples import make_imagefolder
from tests.servers import MotoServer
from training import EXIT_PREEMPTED
from training.preempt import DUPLICATE_WINDOW_S
from training.processes import descendants

SHARDTRAIN = str(Path(sys.executable).with_name("shardtrain"))
NPROC = 2
EPOCH_STEPS = 6  # 96 training images / (2 ranks x batch 8)
EPOCHS = 3
STEPS = EPOCH_STEPS * EPOCHS
EVERY = 2  # checkpoint every 2 steps: saves at 2, 4, 6 (after eval), 8, ...
SAVE_STEPS = list(range(EVERY, STEPS + 1, EVERY))
PREEMPT_TIMEOUT = 20.0  # checkpoint.preempt_timeout: how long a preempted run waits for its last upload
BUCKET = "faults"
RUN = "t"  # the run's name: its files are <runs_dir>/t/ and <storage>/t/
TMP = re.compile(r"^\..*\.tmp\d+$")  # checkpoint.atomic_save's (and its markers') temp files


# ---- runs ------------------------------------------------------------------------------------------------------


def make_store(work: Path) -> str:
    src = make_imagefolder(work / "src", size=48)
    dest = work / "store"
    convert(ConvertOptions(src=str(src), dest=str(dest), format="wds"), progress=False)
    return str(dest)


def run_baseline(folder: Path, store: str, storage: str, label: str, workers: int = 0) -> tuple[dict, float]:
    """Train an uninterrupted run to the end: its final state (what every fault's resume must match) and its seconds."""
    started = time.monotonic()
    code, log = train_to_end(write_config(folder, store, storage, workers=workers))
    seconds = time.monotonic() - started
    if code != 0:
        raise RuntimeError(f"the {label} run failed (exit {code}):\n{log[-3000:]}")
    state = final_state(folder)
    if state is None:  # nothing to compare the faults' resumes with
        raise RuntimeError(f"the {label} run exited 0 without a last.pt:\n{log[-3000:]}")
    print(f"{label}: {STEPS} steps in {seconds:.1f}s", flush=True)
    return state, seconds


def write_config(folder: Path, store: str, storage: str, workers: int = 0) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    cfg = {
        "name": RUN,
        "runs_dir": str(folder / "runs"),
        "seed": 3,
        "data": {"path": store, "image_size": 32, "batch_size": 8, "workers": workers, "pin_memory": False,
                 "channels_last": False},
        "model": {"name": "test_resnet"},
        "optim": {"lr": 3e-3, "warmup_epochs": 0.5},
        "train": {"epochs": EPOCHS, "log_every": 1, "deterministic": True},
        "checkpoint": {"every_steps": EVERY, "keep": 2, "storage": storage, "upload_timeout": 120,
                       "preempt_timeout": PREEMPT_TIMEOUT},
        "resume": "auto",
    }
    path = folder / "run.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


class Run:
    """One `shardtrain train` in its own process group, its output in a log file beside the config."""

    def __init__(self, config: Path) -> None:
        self.config = config
        self.log = config.with_name(f"log-{time.monotonic_ns()}.txt")
        self.started = time.time()
        with open(self.log, "w") as out:
            self.proc = subprocess.Popen([SHARDTRAIN, "train", str(config), "--nproc-per-node", str(NPROC)],
                                         stdout=out, stderr=subprocess.STDOUT, start_new_session=True)

    @property
    def ckpt_dir(self) -> Path:
        return self.config.parent / "runs" / RUN / "checkpoints"

    def text(self) -> str:
        return self.log.read_text(errors="replace")

    def running(self) -> bool:
        return self.proc.poll() is None

    def kill(self) -> float:
        """kill -9 of `shardtrain train` and torchrun (one group; the workers die with torchrun). Returns when."""
        at = time.time()
        os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(timeout=60)
        wait_workers_gone(self.config)
        return at

    def wait(self, timeout: float = 600) -> int:
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            return -9

    def stop(self) -> None:
        if self.running():
            self.kill()


def wait_workers_gone(config: Path, timeout: float = 30) -> None:
    """Until no process of ours still runs `config` (PDEATHSIG is quick, but files must be still when we look)."""
    deadline = time.monotonic() + timeout
    needle = str(config).encode()
    while time.monotonic() < deadline:
        alive = False
        for pid in os.listdir("/proc"):
            try:
                alive = alive or (pid.isdigit() and needle in Path(f"/proc/{pid}/cmdline").read_bytes())
            except OSError:
                continue
        if not alive:
            return
        time.sleep(0.05)


def train_to_end(config: Path) -> tuple[int, str]:
    run = Run(config)
    try:
        code = run.wait()
    finally:
        run.stop()
    return code, run.text()


def wait_until(cond, run: Run, timeout: float = 300, poll: float = 0.002) -> bool:
    """Poll `cond()` until true (True) or the run ends / time runs out (False)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return True
        if not run.running():
            return False
        time.sleep(poll)
    return False


def final_state(folder: Path) -> dict | None:
    path = folder / "runs" / RUN / "checkpoints" / "last.pt"
    return torch.load(path, map_location="cpu", weights_only=True) if path.exists() else None


def identical(a: dict | None, b: dict | None) -> bool:
    """Model and optimizer state equal bit for bit (and both at the last step)."""
    if a is None or b is None or a["step"] != b["step"] or a["model"].keys() != b["model"].keys():
        return False
    if not all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"]):
        return False
    sa, sb = a["optimizer"]["state"], b["optimizer"]["state"]
    return sa.keys() == sb.keys() and all(
        sa[i].keys() == sb[i].keys() and all(torch.equal(sa[i][k], sb[i][k]) for k in sa[i]) for i in sa)


def resumed_step(log: str) -> int | None:
    found = re.search(r"resumed from \S+ at step (\d+)", log)
    return int(found.group(1)) if found else None


def step_lines(log: str) -> list[int]:
    return [int(s) for s in re.findall(r"^step (\d+) epoch", log, re.MULTILINE)]


def step_name(step: int) -> str:
    return f"step_{step:08d}.pt"


# ---- storage ---------------------------------------------------------------------------------------------------


def storage_files(storage: str) -> dict[str, bytes]:
    """Every file in `<storage>/t/checkpoints` by name, with its bytes (an empty dict when the folder is missing)."""
    fs, root = fsspec.core.url_to_fs(f"{storage}/{RUN}/checkpoints", skip_instance_cache=True)
    try:
        names = fs.ls(root, detail=False)
    except FileNotFoundError:
        return {}
    return {n.rsplit("/", 1)[-1]: fs.cat_file(n) for n in names}


def audit(files: dict[str, bytes]) -> dict[str, str]:
    """Each step checkpoint in storage: "ok" (marker's sha256 and size match the bytes), "unmarked", "mismatch"."""
    import hashlib

    out = {}
    for name, data in files.items():
        if not re.match(r"^(step_\d{8}|best)\.pt$", name):
            continue
        marker = files.get(name + ".complete")
        if marker is None:
            out[name] = "unmarked"
            continue
        info = json.loads(marker)
        good = info.get("sha256") == hashlib.sha256(data).hexdigest() and info.get("bytes") == len(data)
        out[name] = "ok" if good else "mismatch"
    return out


def marked_steps(states: dict[str, str]) -> set[int]:
    return {int(n[5:13]) for n, s in states.items() if n.startswith("step_") and s != "unmarked"}


# ---- what the run was doing ------------------------------------------------------------------------------------


def moment(run: Run, storage: str | None) -> str:
    """Classify what a killed (now still) run was doing, from its files, log and storage."""
    log = run.text()
    if "process(es) on" not in log:
        return "startup"
    if "done: step" in log:
        return "finishing"
    if run.ckpt_dir.is_dir() and any(TMP.match(p.name) for p in run.ckpt_dir.iterdir()):
        return "mid-checkpoint"
    steps = step_lines(log)
    if steps and steps[-1] % EPOCH_STEPS == 0 and f"eval epoch {steps[-1] // EPOCH_STEPS} " not in log:
        return "mid-eval"
    if storage and run.ckpt_dir.is_dir():
        local = {int(p.name[5:13]) for p in run.ckpt_dir.glob("step_*.pt.complete")}
        if local - marked_steps(audit(storage_files(storage))):
            return "mid-upload"
    return "mid-step" if steps else "before-first-step"


def aim(run: Run, target: str, rng: random.Random, baseline_s: float) -> None:
    """Wait for the moment `target` names (or until the run moves past it)."""
    ckpt = run.ckpt_dir
    if target == "random":  # uniform over the baseline's wall time (start-up included, as a scheduler sees it)
        at = run.started + rng.uniform(0.3, baseline_s)
        wait_until(lambda: time.time() >= at, run, poll=0.01)
    elif target == "step":
        step = rng.randrange(1, STEPS)
        wait_until(lambda: step in step_lines(run.text()), run, poll=0.005)
        time.sleep(rng.uniform(0, 0.1))
    elif target == "checkpoint":  # the temp file of a random save exists
        name = step_name(rng.choice(SAVE_STEPS))
        wait_until(lambda: (ckpt / f"{name}.complete").exists() or (
            ckpt.is_dir() and any(p.startswith(f".{name}.tmp") for p in os.listdir(ckpt))), run, poll=0.001)
    elif target == "upload":  # a checkpoint just written: its upload is queued or in flight
        name = step_name(rng.choice(SAVE_STEPS[:-1]))
        wait_until(lambda: (ckpt / f"{name}.complete").exists(), run, poll=0.001)
    elif target == "eval":  # an epoch's last step is logged and its eval is running
        step = EPOCH_STEPS * rng.randint(1, EPOCHS)
        wait_until(lambda: step in step_lines(run.text()), run, poll=0.001)


# ---- 1. kill -9 ------------------------------------------------------------------------------------------------


def train_kills(work: Path, store: str, baseline: dict, baseline_s: float, kills: int,
                rng: random.Random) -> dict:
    targets = ["random", "step", "checkpoint", "upload", "eval"]
    moments: Counter = Counter()
    same, lost, killed = 0, [], 0
    for i in range(kills):
        folder = work / f"kill{i}"
        storage = f"s3://{BUCKET}/kill{i}"
        config = write_config(folder, store, storage)
        run = Run(config)
        try:
            aim(run, targets[i % len(targets)], rng, baseline_s)
            at = run.kill() if run.running() else None
        finally:
            run.stop()
        what = moment(run, storage) if at is not None else "after-end"
        moments[what] += 1
        mtimes = {p.name: p.stat().st_mtime for p in run.ckpt_dir.glob("step_*.pt")} if run.ckpt_dir.is_dir() else {}
        code, log = train_to_end(config)
        step = resumed_step(log)
        ok = code == 0 and identical(baseline, final_state(folder))
        same += ok and at is not None
        if at is not None:
            killed += 1
            since = mtimes.get(step_name(step), run.started) if step else run.started
            lost.append(at - since)
        print(f"kill {i + 1}/{kills} at {(at or time.time()) - run.started:.1f}s ({what}): "
              f"resumed at step {step or 0}, {'identical' if ok else f'DIFFERENT (exit {code})'}"
              + (f", {lost[-1]:.1f}s lost" if at is not None else ""), flush=True)
        if not ok:
            print(log[-2000:], flush=True)
        shutil.rmtree(folder / "runs", ignore_errors=True)
    return {
        "train_kills": killed,  # trials whose run ended before its moment are listed as after-end, not counted
        "train_kills_identical": same,
        "train_kill_moments": ",".join(f"{k}:{v}" for k, v in sorted(moments.items())),
        "train_worst_time_lost_s": round(max(lost), 2) if lost else None,
        "train_median_time_lost_s": round(statistics.median(lost), 2) if lost else None,
    }


# ---- 2. SIGTERM and SIGINT, delivered each way the world sends them ------------------------------------------

# How a stop signal reaches the run (see `deliver`). The trials before these modes sent SIGTERM to the launcher
# alone, to runs without DataLoader workers: they could not see a worker killed by torchrun's signal to its
# rank's process group, nor torchrun taking one request delivered twice as two (docs/RELIABILITY.md).
MODES = ("launcher", "group", "every-process", "sigint-launcher", "second-signal")
LOADER_WORKERS = 1  # DataLoader workers per rank in the preemption trials: the signal reaches them too


def deliver(run: Run, mode: str) -> None:
    if mode in ("launcher", "second-signal"):  # Kubernetes, `docker stop`, `kill PID`
        run.proc.send_signal(signal.SIGTERM)
    elif mode == "group":  # `kill -- -PGID`; a terminal's Ctrl-C reaches the same processes
        os.killpg(run.proc.pid, signal.SIGTERM)
    elif mode == "every-process":  # Slurm's scancel, systemd: every process, DataLoader workers included
        for pid in descendants(run.proc.pid):
            try:
                os.kill(pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
    elif mode == "sigint-launcher":  # `kill -INT PID`
        run.proc.send_signal(signal.SIGINT)


def preemptions(work: Path, store: str, moto: MotoServer, trials: int, rng: random.Random,
                budget_s: float | None = None) -> dict:
    """`trials` signals per mode, each at a random step or (but for second-signal) a uniform random time;
    a run that ends before its moment comes is replaced by another;
    every interrupted run resumed to the end and compared with an uninterrupted baseline of the same setup.
    No trial starts once `budget_s` seconds have passed since the baseline (the figures then say how many signals
    each mode got).

    second-signal: S3 goes down, then SIGTERM: the preempted run waits for its last upload, and a second
    SIGTERM 2.5-4 s after the first must stop it at once (exit 143, one line); the resume starts from the
    checkpoint saved locally on the first.
    """
    # The bound: the stop vote is read one step late (2 steps), the checkpoint is written, the upload waited
    # for (checkpoint.preempt_timeout), then the processes exit; 15 s covers steps, write and exit on a
    # loaded 2-core machine with room to spare.
    bound = PREEMPT_TIMEOUT + 15
    baseline, baseline_s = run_baseline(work / "baseline", store, f"s3://{BUCKET}/preempt-baseline",
                                         f"preemption baseline ({LOADER_WORKERS} DataLoader worker per rank)",
                                         workers=LOADER_WORKERS)
    # signals, ok, identical, after-end and the moments hit
    tally: dict[str, Counter[str]] = {mode: Counter() for mode in MODES}
    worst = dict.fromkeys(MODES, 0.0)
    # Round after round, one trial of each mode that still needs one: a campaign cut short has tried every mode.
    # A run that ends before its signal does not count: another one is started.
    deadline = time.monotonic() + (budget_s if budget_s is not None else float("inf"))
    for i, mode in ((i, mode) for i in range(2 * trials) for mode in MODES):
        if tally[mode]["signals"] == trials:
            continue
        if time.monotonic() > deadline:
            print(f"time budget of {budget_s:.0f}s spent: no further trials", flush=True)
            break
        took = preempt_trial(work / f"{mode}{i}", store, moto, mode, i, rng, baseline, baseline_s, bound,
                             tally[mode], trials)
        worst[mode] = max(worst[mode], took or 0.0)
    figures: dict = {"preempt_bound_s": bound}
    for mode, counts in tally.items():
        key = "preempt_" + mode.replace("-", "_")
        moments = {k: v for k, v in counts.items() if k not in ("signals", "ok", "identical")}
        figures |= {f"{key}_signals": counts["signals"], f"{key}_ok": counts["ok"],
                    f"{key}_identical": counts["identical"], f"{key}_exit_max_s": round(worst[mode], 2),
                    f"{key}_moments": ",".join(f"{k}:{v}" for k, v in sorted(moments.items()))}
    figures["preempt_baseline_s"] = round(baseline_s, 1)
    return figures


def preempt_trial(folder: Path, store: str, moto: MotoServer, mode: str, i: int, rng: random.Random, baseline: dict,
                  baseline_s: float, bound: float, counts: Counter, trials: int) -> float | None:
    """One signal delivered as `mode`, then the resume to the end; counted in `counts`. Returns the seconds from
    the (last) signal to the exit, None when the run ended before its moment came."""
    storage = f"s3://{BUCKET}/{folder.name}"
    config = write_config(folder, store, storage, workers=LOADER_WORKERS)
    run = Run(config)
    outage = False
    try:
        aim(run, "step" if i % 2 == 0 or mode == "second-signal" else "random", rng, baseline_s)
        if not run.running():
            counts["after-end"] += 1
            print(f"{mode}: the run ended before the signal (not counted)", flush=True)
            return None
        what = phase(run)
        counts[what] += 1
        counts["signals"] += 1
        if mode == "second-signal":
            moto.stop()
            outage = True
        sent = time.time()
        deliver(run, mode)
        if mode == "second-signal":
            time.sleep(rng.uniform(DUPLICATE_WINDOW_S + 0.5, DUPLICATE_WINDOW_S + 2))
            if run.running():
                sent = time.time()
                run.proc.send_signal(signal.SIGTERM)
        code = run.wait(timeout=bound + 120)
        took = time.time() - sent
    finally:
        run.stop()
        if outage:
            moto.start(buckets=(BUCKET,))
    wait_workers_gone(config)
    log = run.text()
    if mode == "second-signal":
        problems = insist_problems(code, took, log)
    else:
        problems = preempt_problems(folder, storage, code, took, bound, what)
    if "Traceback" in log:
        problems.append("a traceback in the output")
    rcode, rlog = train_to_end(config)
    resumed = rcode == 0 and identical(baseline, final_state(folder))
    counts["identical"] += resumed
    if not resumed:
        problems.append(f"resumed run {'exit ' + str(rcode) if rcode else 'differs from the baseline'}")
    counts["ok"] += not problems
    print(f"{mode} {counts['signals']}/{trials} at {sent - run.started:.1f}s ({what}): exit {code} after {took:.1f}s, "
          f"resumed at step {resumed_step(rlog) or 0}: " + ("ok" if not problems else "; ".join(problems)), flush=True)
    if problems:
        print(log[-2000:], flush=True)
    shutil.rmtree(folder / "runs", ignore_errors=True)
    return took


def insist_problems(code: int, took: float, log: str) -> list[str]:
    """A second signal: exit 128 + SIGTERM within a few seconds, its one line last."""
    problems = []
    if code != 128 + signal.SIGTERM:
        problems.append(f"exit {code}, not {128 + signal.SIGTERM}")
    if took > 5:
        problems.append(f"took {took:.1f}s after the second signal")
    if not log.rstrip().endswith("a rerun resumes from the last checkpoint"):
        problems.append("not ended by the second signal's line")
    return problems


def phase(run: Run) -> str:
    """Where a run is when it gets its signal: its launcher's imports (torchrun not started yet), the
    workers' start-up, training, or past its last step."""
    log = run.text()
    if f"step {STEPS} epoch" in log:
        return "finishing"
    if "process(es) on" in log:
        return "training"
    children = Path(f"/proc/{run.proc.pid}/task/{run.proc.pid}/children").read_text().split()
    for child in children:
        try:
            if b"training.torchrun" in Path(f"/proc/{child}/cmdline").read_bytes():
                return "worker-startup"
        except OSError:
            continue
    return "launcher-startup"


def preempt_problems(folder: Path, storage: str, code: int, took: float, bound: float, when: str) -> list[str]:
    """What a preempted run got wrong: exit code (75; 0 also right past the last step), time, and the
    checkpoint of preempted.json saved here and in storage (required once training had begun)."""
    problems = []
    # The log lags the loop: a signal seen as "training" may have come after the last step's stop vote,
    # and then the run rightly finishes (exit 0, metrics.json at the last step) instead of preempting.
    metrics = folder / "runs" / RUN / "metrics.json"
    finished = code == 0 and metrics.exists() and json.loads(metrics.read_text())["step"] == STEPS
    if finished:
        when = "finishing"
    if code != EXIT_PREEMPTED and not (when == "finishing" and code == 0):
        problems.append(f"exit {code}, not {EXIT_PREEMPTED}")
    if took > bound:
        problems.append(f"took {took:.1f}s > {bound:.0f}s")
    marker = folder / "runs" / RUN / "preempted.json"
    if not marker.exists():
        return problems + (["no preempted.json"] if when == "training" else [])
    name = step_name(json.loads(marker.read_text())["step"])
    if not (folder / "runs" / RUN / "checkpoints" / f"{name}.complete").exists():
        problems.append(f"{name} not saved locally")
    state = audit(storage_files(storage)).get(name)
    if state != "ok":
        problems.append(f"{name} in storage: {state or 'missing'}")
    return problems


# ---- 3. storage ------------------------------------------------------------------------------------------------


def outage(moto: MotoServer, seconds: float) -> None:
    """S3 down for `seconds`; a restarted moto is empty but for the bucket (uploads must redo what is needed)."""
    moto.stop()
    try:
        time.sleep(seconds)
    finally:
        moto.start(buckets=(BUCKET,))


def storage_outages(work: Path, store: str, moto: MotoServer, runs: int, rng: random.Random) -> dict:
    """Runs that meet several S3 outages while they upload: each must exit 0 with its newest checkpoint,
    best.pt and metrics.json in storage, every marker matching its bytes, no more than `keep` steps.
    (The uploader skips a queued checkpoint that a newer one supersedes, by design: storage holds the
    newest, not every one the run dir keeps.)"""
    outages = good = 0
    for i in range(runs):
        folder = work / f"outage{i}"
        storage = f"s3://{BUCKET}/outage{i}"
        config = write_config(folder, store, storage)
        run = Run(config)
        cuts = []
        try:
            # Each outage starts at a random step's line: not before the first (the resume lookup needs
            # storage, and says so with exit 2), and not once the last checkpoint is written (a restarted
            # moto forgets what was uploaded before, which real storage would not).
            for step in sorted(rng.sample(range(1, STEPS - 1), rng.randint(2, 3))):
                wait_until(lambda: step in step_lines(run.text()), run, poll=0.005)  # noqa: B023 - used within this iteration
                if not run.running() or f"checkpoint step {STEPS}:" in run.text():
                    break
                cuts.append(rng.uniform(0.3, 3.0))
                outage(moto, cuts[-1])
            code = run.wait()
        finally:
            run.stop()
        outages += len(cuts)
        files = storage_files(storage)
        states = audit(files)
        newest = step_name(STEPS)
        problems = [f"exit {code}"] if code != 0 else []
        if "metrics.json" not in files:
            problems.append("no metrics.json in storage")
        problems += [f"{n} {s}" for n, s in states.items() if s == "mismatch"]
        for name in (newest, "best.pt"):
            if states.get(name) != "ok":
                problems.append(f"{name} in storage: {states.get(name, 'missing')}")
        if len([n for n in states if n.startswith("step_")]) > 2:  # checkpoint.keep
            problems.append("storage keeps more step checkpoints than checkpoint.keep")
        good += not problems
        print(f"outage run {i + 1}/{runs}: {len(cuts)} outages of {', '.join(f'{c:.1f}' for c in cuts)}s: "
              f"exit {code}, storage {sorted(states.items())}: " + ("ok" if not problems else "; ".join(problems)),
              flush=True)
        shutil.rmtree(folder / "runs", ignore_errors=True)
    return {"storage_outages": outages, "storage_outage_runs": runs, "storage_outage_runs_ok": good}


def partial_checkpoints(work: Path, store: str, moto: MotoServer, baseline: dict, trials: int,
                        rng: random.Random) -> dict:
    """Kill runs mid-upload or during an outage, lose the run dir, resume from storage alone: what was
    loaded must be a checkpoint whose marker matches it; unmarked files must be skipped."""
    loaded_bad = skipped = same = 0
    for i in range(trials):
        folder = work / f"partial{i}"
        nas = i % 2 == 1  # a NAS copy is a plain file copy: a kill leaves a truly partial file
        storage = str(folder / "nas") if nas else f"s3://{BUCKET}/partial{i}"
        config = write_config(folder, store, storage)
        run = Run(config)
        how = "mid-upload" if nas or i % 4 == 0 else "outage"
        try:
            if how == "mid-upload":
                aim(run, "upload", rng, 0)
            else:
                wait_until(lambda: step_lines(run.text()), run, poll=0.01)  # noqa: B023 - used within this iteration
                moto.stop()
                time.sleep(rng.uniform(0.2, 2.0))
            if run.running():
                run.kill()
        finally:
            run.stop()
            if moto.proc is None:
                moto.start(buckets=(BUCKET,))
        states = audit(storage_files(storage))
        shutil.rmtree(folder / "runs")  # a new machine: only storage is left
        code, log = train_to_end(config)
        step = resumed_step(log)
        marked = marked_steps({n: s for n, s in states.items() if s == "ok"})
        bad = step is not None and step not in marked
        newer_unmarked = [n for n, s in states.items() if s != "ok" and n.startswith("step_")
                          and int(n[5:13]) > (step or 0)]
        loaded_bad += bad
        skipped += bool(newer_unmarked)
        ok = code == 0 and identical(baseline, final_state(folder))
        same += ok
        print(f"partial {i + 1}/{trials} ({'nas' if nas else 's3'}, killed {how}): storage held "
              f"{sorted(states.items()) or 'nothing'}; resumed at step {step or 0}"
              + (" (NOT a verified checkpoint)" if bad else "")
              + (f", skipped {newer_unmarked}" if newer_unmarked else "")
              + (", identical" if ok else f", DIFFERENT (exit {code})"), flush=True)
        shutil.rmtree(folder / "runs", ignore_errors=True)
    return {"partial_trials": trials, "partial_checkpoints_loaded": loaded_bad, "partial_skipped": skipped,
            "partial_resumes_identical": same}


def nas_readonly(work: Path, store: str, rng: random.Random) -> dict:
    """The NAS folder turns read-only (a read-only bind mount over it) mid-run, then writable again."""
    folder = work / "nas-ro"
    nas = folder / "nas"
    nas.mkdir(parents=True)
    config = write_config(folder, store, str(nas))
    run = Run(config)
    mounted, reason = False, ""
    try:
        wait_until(lambda: 2 in step_lines(run.text()), run, poll=0.01)
        for cmd in (["mount", "--bind", str(nas), str(nas)], ["mount", "-o", "remount,ro,bind", str(nas)]):
            done = subprocess.run(cmd, capture_output=True, text=True, check=False)
            if done.returncode != 0:
                reason = f"{' '.join(cmd[:3])}: {done.stderr.strip() or done.returncode}"
                break
            mounted = True
        if reason:
            print(f"nas read-only: cannot make the folder read-only ({reason}); not measured", flush=True)
            return {"nas_readonly_ok": None}
        held = rng.uniform(2.0, 5.0)
        time.sleep(held)
        steps_during = step_lines(run.text())[-1] if step_lines(run.text()) else 0
        unmount(nas)
        mounted = False
        code = run.wait()
    finally:
        if mounted:
            unmount(nas)
        run.stop()
    log = run.text()
    failed = len(re.findall(r"upload of \S+ to storage failed", log))
    states = audit(storage_files(str(nas)))
    ok = code == 0 and states.get(step_name(STEPS)) == "ok" and "mismatch" not in states.values()
    print(f"nas read-only for {held:.1f}s (training reached step {steps_during}): {failed} failed uploads "
          f"logged, exit {code}, storage {sorted(states.items())}: {'ok' if ok else 'FAILED'}", flush=True)
    if not ok:
        print(log[-2000:], flush=True)
    return {"nas_readonly_ok": ok, "nas_readonly_failed_uploads": failed}


def unmount(path: Path) -> None:
    if subprocess.run(["umount", str(path)], capture_output=True, check=False).returncode != 0:
        subprocess.run(["umount", "-l", str(path)], check=True)  # busy (a file open): detach it now


# ---- the part --------------------------------------------------------------------------------------------------


def run(work: Path, kills: int, seed: int) -> dict:
    """Figures: train_kills, train_kills_identical, train_kill_moments, train_worst/median_time_lost_s;
    preempt_<mode>_signals/_ok/_identical/_exit_max_s/_moments per delivery mode (MODES), preempt_bound_s,
    preempt_baseline_s; storage_outages,
    storage_outage_runs(_ok), partial_trials, partial_checkpoints_loaded, partial_skipped,
    partial_resumes_identical; nas_readonly_ok, nas_readonly_failed_uploads; train_baseline_s."""
    work.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    # s3fs here and in every training process finds moto through the AWS_* variables
    with MotoServer().serving(buckets=(BUCKET,)) as moto:
        store = make_store(work)
        baseline, baseline_s = run_baseline(work / "baseline", store, f"s3://{BUCKET}/baseline", "baseline")
        figures = {"train_baseline_s": round(baseline_s, 1)}
        figures |= train_kills(work, store, baseline, baseline_s, kills, rng)
        figures |= preemptions(work / "preempt", store, moto, max(2, kills // 4), rng)
        figures |= storage_outages(work, store, moto, max(1, kills // 4), rng)
        figures |= partial_checkpoints(work, store, moto, baseline, max(2, kills // 4), rng)
        figures |= nas_readonly(work, store, rng)
        return figures


def run_preemptions(work: Path, kills: int, seed: int, budget_s: float | None = None) -> dict:
    """The preemption trials alone (test_campaign.py::test_preemptions): `kills` signals per delivery mode,
    none started after `budget_s` seconds."""
    work.mkdir(parents=True, exist_ok=True)
    with MotoServer().serving(buckets=(BUCKET,)) as moto:
        return preemptions(work, make_store(work), moto, kills, random.Random(seed), budget_s)
