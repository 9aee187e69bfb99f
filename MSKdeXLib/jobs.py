"""Long work as a ``mskdex`` subprocess: JSON-lines progress, logs, cancel. GUI-free.

The Slicer module (and any other front end) starts e.g. ``mskdex train --progress json`` with
:class:`Job`, calls :meth:`Job.poll` from its own thread (a Qt timer) to receive the progress
events (``{"event": "progress"|"log"|"done"|"error", "stage", "step", "total", "elapsed_s",
...}``, see :class:`MSKdeXLib.progress.Progress`), and :meth:`Job.cancel` to stop it. Lines
that are not JSON objects are kept as the job's log (shown with errors). Callbacks run in the
thread that calls :meth:`poll`, never in the reader threads.
"""

from __future__ import annotations

import json
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

from .errors import EXIT_DOUBTFUL

#: set by :class:`Job` for the process it starts: "you are a cancellable job" (see :func:`accept_cancel`)
JOB_ENV = "MSKDEX_JOB"


def accept_cancel() -> None:
    """Called first by a worker (``mskdex``): a job is cancelled with SIGINT, but a shell without
    job control starts background commands with SIGINT ignored and Python keeps it ignored; as a
    job (``$MSKDEX_JOB=1``) take SIGINT back as KeyboardInterrupt (clean exit 130)."""
    if os.environ.get(JOB_ENV) == "1" and signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
        signal.signal(signal.SIGINT, signal.default_int_handler)

PACKAGE_PARENT = str(Path(__file__).resolve().parent.parent)


def python_executable() -> str:
    """The Python to run ``-m MSKdeXLib`` with (inside Slicer: PythonSlicer, not the GUI app)."""
    exe = Path(sys.executable)
    if exe.stem.lower().startswith("slicer"):  # the Slicer application itself
        for name in ("PythonSlicer", "PythonSlicer.exe"):
            cand = exe.parent / name
            if cand.exists():
                return str(cand)
    return sys.executable


def mskdex_command(subcommand: str, *args: str) -> list[str]:
    """Command line running ``mskdex SUBCOMMAND ARGS`` with this installation's MSKdeXLib."""
    return [python_executable(), "-m", "MSKdeXLib", subcommand, *map(str, args)]


def parse_event(line: str) -> dict | None:
    """The JSON object of a progress line, or None when the line is plain log text."""
    text = line.strip()
    if not (text.startswith("{") and text.endswith("}")):
        return None
    try:
        obj = json.loads(text)
    except ValueError:
        return None
    return obj if isinstance(obj, dict) and "event" in obj else None


@dataclass
class JobState:
    """What is known about a job so far (read it after :meth:`Job.poll`)."""

    events: list[dict] = field(default_factory=list)
    log: list[str] = field(default_factory=list)      # non-JSON stderr lines
    stdout: list[str] = field(default_factory=list)   # stdout lines
    step: int = 0
    total: int | None = None
    stage: str = ""
    error: str | None = None                          # from an "error" event or the last log line

    @property
    def fraction(self) -> float | None:
        """Progress in [0, 1] when the total is known."""
        return None if not self.total else min(1.0, self.step / self.total)


class Job:
    """One subprocess with line-wise capture of stdout and stderr.

    ``on_event(dict)`` receives every JSON progress event, ``on_log(str)`` every other line
    (``stream`` name first: ``on_log("stderr", line)``); both are called from :meth:`poll`.
    """

    def __init__(self, command: Sequence[str], on_event: Callable[[dict], None] | None = None,
                 on_log: Callable[[str, str], None] | None = None, cwd: str | Path | None = None,
                 env: dict | None = None):
        self.command = [str(c) for c in command]
        self.on_event, self.on_log = on_event, on_log
        self.cwd, self.env = cwd, env
        self.state = JobState()
        self.cancelled = False
        self.started_at: float | None = None
        self._proc: subprocess.Popen | None = None
        self._queue: queue.Queue = queue.Queue()
        self._readers: list[threading.Thread] = []

    # --- lifecycle --------------------------------------------------------------------------
    def start(self) -> "Job":
        env = dict(os.environ if self.env is None else self.env)
        env["PYTHONPATH"] = os.pathsep.join(p for p in (PACKAGE_PARENT, env.get("PYTHONPATH")) if p)
        env.setdefault("PYTHONUNBUFFERED", "1")
        env[JOB_ENV] = "1"  # cancel() sends SIGINT: the worker accepts it even if started with it ignored
        kwargs: dict = {}
        if os.name == "nt":
            # own console group (CTRL_BREAK reaches it, not Slicer) and no console window popping up
            kwargs["creationflags"] = (subprocess.CREATE_NEW_PROCESS_GROUP  # type: ignore[attr-defined]
                                       | subprocess.CREATE_NO_WINDOW)  # type: ignore[attr-defined]
        else:
            # own process group: inside Slicer the process is the PythonSlicer launcher, which does
            # not forward signals to the interpreter it starts; cancel() signals the whole group
            kwargs["start_new_session"] = True
        self._proc = subprocess.Popen(self.command, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                      stdin=subprocess.DEVNULL, cwd=self.cwd, env=env, text=True,
                                      encoding="utf-8", errors="replace", bufsize=1, **kwargs)
        self._tree = _ProcessTree(self._proc)
        self.started_at = time.time()
        for name, stream in (("stdout", self._proc.stdout), ("stderr", self._proc.stderr)):
            t = threading.Thread(target=self._read, args=(name, stream), daemon=True)
            t.start()
            self._readers.append(t)
        return self

    def _read(self, name: str, stream) -> None:
        for line in stream:
            self._queue.put((name, line.rstrip("\r\n")))
        stream.close()

    @property
    def pid(self) -> int | None:
        return None if self._proc is None else self._proc.pid

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    @property
    def returncode(self) -> int | None:
        return None if self._proc is None else self._proc.poll()

    @property
    def finished(self) -> bool:
        """True once the process ended and all its output was handed out by :meth:`poll`."""
        return (self._proc is not None and self._proc.poll() is not None
                and not any(t.is_alive() for t in self._readers) and self._queue.empty())

    @property
    def succeeded(self) -> bool:
        # EXIT_DOUBTFUL: register finished with its outputs written, one registration to check visually
        return self.finished and self.returncode in (0, EXIT_DOUBTFUL) and not self.cancelled

    # --- output -----------------------------------------------------------------------------
    def poll(self) -> list[dict]:
        """Hand out the lines received so far; returns the new progress events."""
        new = []
        while True:
            try:
                stream, line = self._queue.get_nowait()
            except queue.Empty:
                break
            event = parse_event(line) if stream == "stderr" else None
            if event is None:
                (self.state.stdout if stream == "stdout" else self.state.log).append(line)
                if stream == "stderr" and ": error: " in line:
                    self.state.error = line.split(": error: ", 1)[1].strip()
                if self.on_log:
                    self.on_log(stream, line)
                continue
            self._apply(event)
            new.append(event)
            if self.on_event:
                self.on_event(event)
        return new

    def _apply(self, event: dict) -> None:
        st = self.state
        st.events.append(event)
        st.stage = str(event.get("stage", st.stage))
        if isinstance(event.get("step"), int):
            st.step = event["step"]
        if "total" in event:
            st.total = event["total"]
        if event.get("event") == "error":
            st.error = str(event.get("message", event.get("error", "error")))

    def wait(self, timeout: float | None = None) -> int:
        """Block until the job ends (poll()ing its output); returns the exit code.

        Raises TimeoutError after ``timeout`` seconds (the job keeps running)."""
        if self._proc is None:
            raise RuntimeError("job not started")
        t_end = None if timeout is None else time.time() + timeout
        while not self.finished:
            if t_end is not None and time.time() > t_end:
                raise TimeoutError(f"job still running after {timeout} s: {' '.join(self.command)}")
            self.poll()
            time.sleep(0.02)
        self.poll()
        return int(self._proc.returncode)

    # --- cancel -----------------------------------------------------------------------------
    def cancel(self, grace_s: float = 5.0) -> None:
        """Stop the job and every process it started (a launcher's child included): ask first
        (SIGINT / CTRL_BREAK to its process group: ``mskdex`` exits cleanly, code 130), kill
        the whole group (POSIX) or job object (Windows) after ``grace_s`` seconds."""
        if self._proc is None or (self._proc.poll() is not None and not self._tree.alive()):
            return
        self.cancelled = True
        self._tree.interrupt()
        t_end = time.time() + grace_s
        while self._tree.alive() and time.time() < t_end:
            time.sleep(0.05)
        if self._tree.alive():
            self._tree.kill()
        try:
            self._proc.wait(grace_s)
        except subprocess.TimeoutExpired:
            self._proc.kill()
            self._proc.wait()

    def summary(self) -> str:
        """One paragraph for an error box: the command, exit code, error and the log tail."""
        tail = "\n".join(self.state.log[-20:])
        status = "cancelled" if self.cancelled else f"exit code {self.returncode}"
        head = f"{' '.join(self.command[2:]) if len(self.command) > 2 else ' '.join(self.command)} ({status})"
        return "\n".join(x for x in (head, self.state.error or "", tail) if x)


class _ProcessTree:
    """A started process and everything it starts: its process group (POSIX, the process leads
    a new session) or a job object that kills its members when closed (Windows)."""

    def __init__(self, proc: subprocess.Popen):
        self.proc = proc
        self._job = _windows_job_object(proc) if os.name == "nt" else None

    def alive(self) -> bool:
        if os.name == "nt":
            return self.proc.poll() is None or (self._job is not None and self._job.active() > 0)
        self.proc.poll()  # reap the leader when it ended
        try:
            os.killpg(self.proc.pid, 0)
        except (ProcessLookupError, PermissionError):
            return False
        return True

    def interrupt(self) -> None:
        try:
            if os.name == "nt":
                self.proc.send_signal(signal.CTRL_BREAK_EVENT)  # type: ignore[attr-defined]
            else:
                os.killpg(self.proc.pid, signal.SIGINT)
        except OSError:  # e.g. CTRL_BREAK from a GUI process without a console: kill instead
            self.kill()

    def kill(self) -> None:
        try:
            if os.name == "nt":
                if self._job is not None:
                    self._job.terminate()
                self.proc.kill()
            else:
                os.killpg(self.proc.pid, signal.SIGKILL)
        except OSError:
            pass


def _windows_job_object(proc: subprocess.Popen):
    """A Windows job object holding ``proc`` (children join it), closed = all killed; None when
    it cannot be created (the process alone is then stopped)."""
    import ctypes
    from ctypes import wintypes

    kernel32 = ctypes.WinDLL("kernel32", use_last_error=True)  # type: ignore[attr-defined]

    class _Limits(ctypes.Structure):
        _fields_ = [("PerProcessUserTimeLimit", ctypes.c_int64), ("PerJobUserTimeLimit", ctypes.c_int64),
                    ("LimitFlags", wintypes.DWORD), ("MinimumWorkingSetSize", ctypes.c_size_t),
                    ("MaximumWorkingSetSize", ctypes.c_size_t), ("ActiveProcessLimit", wintypes.DWORD),
                    ("Affinity", ctypes.c_size_t), ("PriorityClass", wintypes.DWORD),
                    ("SchedulingClass", wintypes.DWORD)]

    class _Io(ctypes.Structure):
        _fields_ = [(n, ctypes.c_uint64) for n in ("ReadOperationCount", "WriteOperationCount",
                                                   "OtherOperationCount", "ReadTransferCount",
                                                   "WriteTransferCount", "OtherTransferCount")]

    class _Extended(ctypes.Structure):
        _fields_ = [("BasicLimitInformation", _Limits), ("IoInfo", _Io), ("ProcessMemoryLimit", ctypes.c_size_t),
                    ("JobMemoryLimit", ctypes.c_size_t), ("PeakProcessMemoryUsed", ctypes.c_size_t),
                    ("PeakJobMemoryUsed", ctypes.c_size_t)]

    class _Accounting(ctypes.Structure):
        _fields_ = [("TotalUserTime", ctypes.c_int64), ("TotalKernelTime", ctypes.c_int64),
                    ("ThisPeriodTotalUserTime", ctypes.c_int64), ("ThisPeriodTotalKernelTime", ctypes.c_int64),
                    ("TotalPageFaultCount", wintypes.DWORD), ("TotalProcesses", wintypes.DWORD),
                    ("ActiveProcesses", wintypes.DWORD), ("TotalTerminatedProcesses", wintypes.DWORD)]

    JOB_OBJECT_LIMIT_KILL_ON_JOB_CLOSE, EXTENDED_LIMIT_INFORMATION, BASIC_ACCOUNTING_INFORMATION = 0x2000, 9, 1
    handle = kernel32.CreateJobObjectW(None, None)
    if not handle:
        return None
    info = _Extended()
    info.BasicLimitInformation.LimitFlags = JOB_OBJECT_LIMIT_KILL_ON_JOB_CLOSE
    kernel32.SetInformationJobObject(handle, EXTENDED_LIMIT_INFORMATION, ctypes.byref(info), ctypes.sizeof(info))
    if not kernel32.AssignProcessToJobObject(handle, wintypes.HANDLE(proc._handle)):  # type: ignore[attr-defined]
        kernel32.CloseHandle(handle)
        return None

    class _Job:
        def active(self) -> int:
            acc = _Accounting()
            ok = kernel32.QueryInformationJobObject(handle, BASIC_ACCOUNTING_INFORMATION, ctypes.byref(acc),
                                                    ctypes.sizeof(acc), None)
            return int(acc.ActiveProcesses) if ok else 0

        def terminate(self) -> None:
            kernel32.TerminateJobObject(handle, 1)

    return _Job()


def run_mskdex(subcommand: str, *args: str, timeout: float | None = None,
               on_event: Callable[[dict], None] | None = None) -> Job:
    """Run ``mskdex SUBCOMMAND ARGS`` to the end (blocking); returns the finished Job."""
    job = Job(mskdex_command(subcommand, *args), on_event=on_event).start()
    try:
        job.wait(timeout)
    except TimeoutError:
        job.cancel()
        raise
    return job


# ---------------------------------------------------------------------------------------------
# Command lines of the long subcommands (what front ends start; checked against the real parser)
# ---------------------------------------------------------------------------------------------
def _spacing_args(flag: str, spacing_mm) -> list[str]:
    if spacing_mm is None:
        return []
    vals = [spacing_mm] if isinstance(spacing_mm, (int, float)) else list(spacing_mm)
    return [flag, *(repr(float(v)) for v in vals)]


def register_args(ct: str, labels: str, xray: str, out: str, bones: str | None = None,
                  landmarks: str | None = None, sid_mm: float | None = None, spacing_mm=None,
                  table: str | None = None, device: str = "auto", force: bool = False,
                  extra: Sequence[str] = ()) -> list[str]:
    """Arguments of ``mskdex register`` (with ``--progress json``): ``bones`` comma-separated
    bodies (pelvis,femur_left,NAME=a+b), ``landmarks`` a CSV x,y,z,row,col, ``spacing_mm`` the
    radiograph's (row, col) pixel spacing, ``sid_mm`` the source-to-image distance."""
    args = ["--ct", ct, "--labels", labels, "--xray", xray, "--out", out, "--device", device]
    if table:
        args += ["--table", table]
    if bones:
        args += ["--bones", bones]
    if landmarks:
        args += ["--landmarks", landmarks]
    if sid_mm:
        args += ["--sid", repr(float(sid_mm))]
    args += _spacing_args("--pixel-spacing", spacing_mm)
    if force:
        args.append("--force")
    return ["register", *map(str, args), *map(str, extra), "--progress", "json"]


def train_args(data: str, out: str, config: str | None = None, resume: bool = False, device: str = "auto",
               steps: int | None = None, force: bool = False) -> list[str]:
    """Arguments of ``mskdex train`` (with ``--progress json``): ``data`` the training-set folder."""
    args = ["--data", data, "--out", out, "--device", device]
    if config:
        args += ["--config", config]
    if resume:
        args.append("--resume")
    if steps is not None:
        args += ["--steps", str(int(steps))]
    if force:
        args.append("--force")
    return ["train", *map(str, args), "--progress", "json"]


def predict_args(model: str, xray: str, out: str, device: str = "auto", pixel_spacing_mm=None,
                 tta: int | None = None, force: bool = False) -> list[str]:
    """Arguments of ``mskdex predict`` (it reports no progress events: one quick step)."""
    args = ["--model", model, "--xray", xray, "--out", out, "--device", device]
    args += _spacing_args("--pixel-spacing", pixel_spacing_mm)
    if tta is not None:
        args += ["--tta", str(int(tta))]
    if force:
        args.append("--force")
    return ["predict", *map(str, args)]


def followup_args(ct: str, labels: str, xray: str, out: str, registration: str | None = None,
                  sid_mm: float | None = None, spacing_mm=None, table: str | None = None, force: bool = False,
                  reader: str | None = None, extra: Sequence[str] = ()) -> list[str]:
    """Arguments of ``mskdex followup`` (with ``--progress json``): the baseline CT + labels, the
    follow-up radiograph ``xray`` with its (row, col) ``spacing_mm`` and ``sid_mm``, and optionally a
    ``registration`` (a registration.json whose first body's pose places the CT; else it registers)
    and the ``reader`` (``--reader``: ridge or fit; None: the command's default)."""
    args = ["--ct", ct, "--labels", labels, "--xray", xray, "--out", out]
    if reader:
        args += ["--reader", reader]
    if table:
        args += ["--table", table]
    if registration:
        args += ["--registration", registration]
    if sid_mm:
        args += ["--sid", repr(float(sid_mm))]
    args += _spacing_args("--pixel-spacing", spacing_mm)
    if force:
        args.append("--force")
    return ["followup", *map(str, args), *map(str, extra), "--progress", "json"]


#: keys of ``mskdex train --progress json`` events that carry losses (MSKdeXLib.learning.training)
LOSS_PREFIX = "loss_"


def losses_of(event: dict) -> dict[str, float]:
    """The losses of a training progress event: {'total': ..., 'intensity_sum': ...} from its
    ``loss_total`` / ``loss_intensity_sum`` keys (empty for other events)."""
    out = {}
    for k, v in event.items():
        if k.startswith(LOSS_PREFIX) and isinstance(v, (int, float)) and not isinstance(v, bool):
            out[k[len(LOSS_PREFIX):]] = float(v)
    return out
