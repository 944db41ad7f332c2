"""Quiet output for ``faceid pipeline run --local`` (``faceid_pipelines.runner.run_local``).

KFP's local runner has no quiet switch: it logs each task's start, status and outputs on the root
logger (a handler on stdout it installs per call), and prints each task subprocess's output line
by line with print() (kfp/local/subprocess_task_handler.py), that output starting with the KFP
executor's INFO lines and the task's whole executor input as JSON (kfp/dsl/executor_main.py sets
its level; nothing reaches it). So, for a quiet run (:func:`quiet_output`): a filter on the root
logger turns KFP's task records into one line each, stdout is a stream that drops the executor's
INFO lines and JSON, and two KFP warnings that are expected locally are ignored. Everything else
a task prints (its summary, its errors, tracebacks) passes as it is, and every line, dropped or
not, goes to the run's log file.
"""

from __future__ import annotations

import contextlib
import io
import logging
import re
import sys
import time
import warnings
from pathlib import Path

_ANSI = re.compile(r"\x1b\[[0-9;]*m")
_EXECUTOR_INFO = re.compile(r"\[KFP Executor [^\]]* INFO\]: ")  # its WARNING/ERROR lines are kept
_STARTED = re.compile(r"Executing task '(?P<task>[^']+)'$")
_FINISHED = re.compile(r"Task '(?P<task>[^']+)' finished with status (?P<status>\w+)$")
_KFP_CHATTER = re.compile(r"Streamed logs:|Task '[^']+' (outputs:|has no outputs)|Running pipeline: "
                          r"|Pipeline '[^']+' finished with status SUCCESS|Cleaned up workspace: ")
_IMPORTER = re.compile(r"importer(-\d+)?$")  # KFP's importer tasks: the inputs, nothing runs
# tqdm's default bar: "desc: 42%|████▏     | 5/12 [00:03<00:04,  1.7it/s, loss=...]" (maybe more text after)
_BAR = re.compile(r"(?P<desc>.*?)\s*(?P<pct>\d+)%\|[^|]*\|\s*[\d.]+[kMG]?/[\d.]+[kMG]? \[[^\]]*\]")
_KFP_LOCAL_WARNINGS = (  # (message regex, category): what KFP warns about every task of a local run
    (r"Task '.*': settings \[.*\] have no effect in the current local runner", UserWarning),
    (r"You may be attemping to run a task that uses custom or non-Python base image", RuntimeWarning),
)


@contextlib.contextmanager
def quiet_output(log_path: Path):
    """For the block: KFP's output quiet (see above) and whole in ``log_path``."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "w", encoding="utf-8", errors="replace", buffering=1) as log, \
            warnings.catch_warnings():
        for message, category in _KFP_LOCAL_WARNINGS:
            warnings.filterwarnings("ignore", message=message, category=category)
        out = _QuietStream(sys.stdout, log)
        records = _KfpRecords(out)
        root = logging.getLogger()  # KFP logs with logging.info(): records of the root logger itself
        root.addFilter(records)
        try:
            with contextlib.redirect_stdout(out):
                yield
        finally:
            root.removeFilter(records)
            out.end()


class _KfpRecords(logging.Filter):
    """KFP's records: a task's start and end become one line each (importer tasks none); the rest of
    its INFO chatter is dropped; warnings and errors are kept. All go to the log file."""

    def __init__(self, out: _QuietStream):
        super().__init__()
        self.out = out
        self.started: dict[str, float] = {}

    def filter(self, record: logging.LogRecord) -> bool:
        message = _ANSI.sub("", record.getMessage())
        keep = self._keep(record, message)
        if not keep:  # a kept one reaches the log file through stdout
            self.out.log_line(f"{time.strftime('%H:%M:%S')} {record.levelname} - {message}")
        return keep

    def _keep(self, record: logging.LogRecord, message: str) -> bool:
        if m := _STARTED.match(message):
            self.started[m["task"]] = time.monotonic()
            if not _IMPORTER.match(m["task"]):
                self.out.say(f"[{m['task']}] started")
            return False
        if m := _FINISHED.match(message):
            task, ok = m["task"], m["status"] == "SUCCESS"
            seconds = time.monotonic() - self.started.pop(task, time.monotonic())
            if ok and _IMPORTER.match(task):
                return False
            self.out.say(f"[{task}] done in {seconds:.0f} s" if ok else
                         f"[{task}] {m['status']} after {seconds:.0f} s (its output is above; full log {self.out.log.name})")
            return False
        if record.levelno < logging.WARNING and _KFP_CHATTER.match(message):
            return False
        return record.levelno >= logging.WARNING or "cache hit" in message or "failed (attempt" in message


class _QuietStream(io.TextIOBase):
    """Stands for stdout while KFP prints the tasks' output: every line goes to the log file; on the
    terminal, the KFP executor's INFO lines, the executor input JSON after them, blank lines and KFP's
    rules are dropped, and a progress bar (tqdm: its updates arrive as lines, the subprocess's ``\\r``
    read as line ends) is redrawn in place on a terminal, or written once, at its last state, elsewhere."""

    def __init__(self, stream, log):
        super().__init__()
        self.stream, self.log = stream, log
        self.tty = bool(getattr(stream, "isatty", lambda: False)())
        self.pending = ""  # a line not finished yet
        self.in_json = False
        self.bar: tuple[str, int, str] | None = None  # (description, percent, line) of the open bar

    @property
    def encoding(self):
        return getattr(self.stream, "encoding", "utf-8")

    def isatty(self) -> bool:
        return self.tty

    def writable(self) -> bool:
        return True

    def write(self, text: str) -> int:
        self.pending += text
        *lines, self.pending = self.pending.split("\n")
        for line in lines:
            self.log.write(_ANSI.sub("", line) + "\n")
            self._line(line)
        return len(text)

    def flush(self) -> None:
        self.stream.flush()

    def log_line(self, text: str) -> None:
        self.log.write(text + "\n")

    def say(self, text: str) -> None:
        """A line of the runner's own (not in the log file twice: the record is there)."""
        self._end_bar()
        self.in_json = False
        self.stream.write(text + "\n")
        self.stream.flush()

    def end(self) -> None:
        if self.pending:
            self.write("\n")
        self._end_bar()
        self.stream.flush()

    def _line(self, line: str) -> None:
        body = line.strip()
        if self.in_json:  # json.dumps(indent=4) of the executor input, indented 4 more by KFP
            inner = line[4:] if line.startswith("    ") else line
            if inner[:1] in ("{", "}", " ", '"', "]", "["):
                self.in_json = inner.rstrip() != "}"
                return
            self.in_json = False
        if _EXECUTOR_INFO.search(body):
            self.in_json = body.endswith("Got executor_input:")
            return
        if not body or (len(body) >= 20 and set(body) == {"-"}):
            return
        if m := _BAR.match(line):
            self._bar(m["desc"].strip(), int(m["pct"]), m[0])
            rest = line[m.end():]
            if rest.strip():
                self._line(" " * (len(line) - len(line.lstrip())) + rest)
            return
        self._end_bar()
        self.stream.write(line + "\n")
        self.stream.flush()

    def _bar(self, desc: str, pct: int, line: str) -> None:
        if self.bar and (self.bar[0] != desc or pct < self.bar[1]):
            self._end_bar()  # another bar
        self.bar = (desc, pct, line)
        if self.tty:
            self.stream.write("\r" + line + "\x1b[K")
            self.stream.flush()

    def _end_bar(self) -> None:
        if self.bar:
            self.stream.write("\n" if self.tty else self.bar[2] + "\n")
            self.bar = None
