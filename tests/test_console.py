"""The console of ``sslrun launch`` and ``sslrun train``: quiet by default with every line kept in OUTPUT/logs,
one progress view (timestamped plain lines off a terminal, a bar redrawn in place on one), and the dashboard
token kept private. The launch test starts the real embedded Ray: run it in the loopback-only namespace."""

from __future__ import annotations

import io
import os
import pty
import re
import socket
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

from sslrun.cluster.console import is_noise
from sslrun.cluster.local_ray import private_token_file
from sslrun.core.train.progress import ProgressView, event_line, parse_event

SSLRUN = str(Path(sys.executable).with_name("sslrun"))
# What Ray 2.60, torch and Ray Data print on a plain `make demo`, none of it the person's business.
NOISE = [
    "2026-12-02 01:05:54,861\tWARNING authentication_token_setup.py:85 -- Token authentication is enabled for this "
    "Ray cluster. Set RAY_AUTH_MODE=disabled to opt out.",
    "[2026-12-02 01:05:54,865 W 8532 8532] network_util.cc:330: Failed to determine local IP via external "
    "connectivity to: 8.8.8.8:53, [2001:4860:4860::8888]:53, falling back to hostname resolution",
    "[W1202 01:06:28.664879594 socket.cpp:207] [c10d] The hostname of the client socket cannot be retrieved. err=-3",
    "/x/ray/data/_internal/execution/interfaces/execution_options.py:436: RayDeprecationWarning: "
    "`ExecutionOptions.exclude_resources` is deprecated",
]
NOISE_MARKERS = [
    "RayDeprecationWarning",
    "PreemptionWatcher",
    "Failed to determine local IP",
    "Token authentication is enabled",
    "[c10d] The hostname",
    "(RayTrainWorker pid=",
    "\x1b[",
]
QUICK = [
    "data.dataset_kwargs.num_samples=512",
    "data.dataset_kwargs.test_samples=64",
    "data.dataset_kwargs.size=16",
    "log.visuals_every=0",
    "log.log_every=5",
    "log.checkpoint_every=10",
    "schedule.warmup_epochs=0",
]
PLAIN_PROGRESS = re.compile(r"^\d\d:\d\d:\d\d step (\d+)/(\d+)  epoch 1/1  loss \d+\.\d{4}  [\d,]+ img/s  eta ")


def _quick(output: Path, max_steps: int, *extra: str) -> list[str]:
    args = ["--method", "simclr", "--encoder", "small_cnn", "--dataset", "synthetic", "--epochs", "1"]
    args += ["--max-steps", str(max_steps), "--batch-size", "16", "--output", str(output)]
    return args + [x for s in [*QUICK, *extra] for x in ("--set", s)]


# ---- pieces ------------------------------------------------------------------------------------------------------
def test_the_noise_of_a_plain_demo_is_recognised_and_messages_are_not() -> None:
    assert all(is_noise(line) for line in NOISE)
    for line in [
        "training simclr + small_cnn on fashion-mnist: 234 steps/epoch x 1 epochs",
        "epoch 0: kNN top-1 72.06% (top-5 98.97%, 7.6 s)",
        "[2026-12-02 01:06:28,153 E 9907 9952] core_worker.cc:2465: an error",  # errors are never noise
        "error: worker rank 0 failed: ValueError",
    ]:
        assert not is_noise(line), line


def test_plain_progress_is_timestamped_throttled_and_has_no_colour_codes() -> None:
    out = io.StringIO()
    view = ProgressView("auto", total_steps=100, epochs=2, world_size=2, every_s=3600, stream=out)
    assert view.mode == "plain"  # a StringIO is not a terminal
    view.update(10, 0, 5.5, 1234.0, data_share=0.9)
    view.update(20, 0, 5.4, 1300.0, data_share=0.9)  # throttled
    view.knn_top1 = 71.5
    view.update(100, 1, 5.0, 1400.0, data_share=0.9, force=True)
    view.echo("a message")
    view.close()
    lines = out.getvalue().splitlines()
    assert re.match(r"^\d\d:\d\d:\d\d step 10/100  epoch 1/2  loss 5\.5000  1,234 img/s  eta \S+  2 workers$", lines[0])
    assert re.match(r"^\d\d:\d\d:\d\d step 100/100  epoch 2/2 .* 2 workers  kNN top-1 71\.50%$", lines[1])
    assert "slow data loader: 90% of each step waits for data" in lines[2]  # once, after 3 slow windows
    assert lines[3].endswith(" a message") and len(lines) == 4 and "\x1b" not in out.getvalue()
    assert parse_event(event_line({"step": 3, "train/loss": 1.5})) == {"step": 3, "train/loss": 1.5}
    assert parse_event("step 3/10 ...") is None


def test_the_dashboard_token_is_created_private_and_an_open_one_is_tightened(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    for name in ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH"):
        monkeypatch.delenv(name, raising=False)
    token = private_token_file(tmp_path)
    assert token == tmp_path / ".ray" / "auth_token" and stat.S_IMODE(token.stat().st_mode) == 0o600
    assert re.fullmatch(r"[0-9a-f]{64}", token.read_text())  # Ray's own format: 256 bits, hex
    first = token.read_text()
    token.chmod(0o644)  # as an earlier Ray left it
    assert private_token_file(tmp_path) == token and stat.S_IMODE(token.stat().st_mode) == 0o600
    assert token.read_text() == first  # an existing token is kept: running clusters and browsers still use it
    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")
    assert private_token_file(tmp_path) is None


# ---- a terminal: the bar redraws in place -------------------------------------------------------------------------
def test_on_a_terminal_the_progress_bar_redraws_in_place(tmp_path: Path) -> None:
    """`sslrun train` in a pseudo-terminal: one bar, updated by cursor moves, not one line per update."""
    env = {**os.environ, "COLUMNS": "160", "LINES": "40", "TERM": "xterm-256color", "OMP_NUM_THREADS": "1"}
    args = [SSLRUN, "train", *_quick(tmp_path / "tty", 20, "log.knn_every=0", "log.log_every=2"), "--device", "cpu"]
    pid, fd = pty.fork()
    if pid == 0:  # the child: its stdout is the terminal
        os.execve(SSLRUN, args, env)
    chunks, deadline = [], time.monotonic() + 240
    while time.monotonic() < deadline:
        try:
            data = os.read(fd, 65536)
        except OSError:  # EIO: the child closed the terminal
            break
        if not data:
            break
        chunks.append(data)
    _, status = os.waitpid(pid, 0)
    text = b"".join(chunks).decode(errors="replace")
    assert os.waitstatus_to_exitcode(status) == 0, text[-2000:]
    counts = re.findall(r"(\d+)/20", text)
    assert len(set(counts)) >= 3, text[-2000:]  # the bar showed several steps ...
    assert "\r" in text and "\x1b[2K" in text  # ... by rewriting its line in place
    assert not re.search(r"^step \d+/20", text, re.M)  # and printed no plain progress lines
    assert "1 worker" in text  # the world size, in the bar


# ---- the embedded default, stdout not a terminal -------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.ray
def test_launch_off_a_terminal_is_quiet_keeps_every_log_and_shows_progress(tmp_path: Path) -> None:
    others = [name for _, name in socket.if_nameindex() if name != "lo"]
    if others:
        pytest.fail(f"run in a loopback-only network namespace (found {others}); see tests/test_launch.py")
    out = tmp_path / "quiet"
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0"}
    env.pop("RAY_AUTH_MODE", None)  # Ray's default: token authentication on, and its notice printed
    proc = subprocess.run(
        [SSLRUN, "launch", *_quick(out, 30, "log.knn_every=1")],
        capture_output=True,
        text=True,
        timeout=420,
        env=env,
    )
    text = proc.stdout + proc.stderr
    assert proc.returncode == 0, text
    for marker in NOISE_MARKERS:
        assert marker not in text, (marker, text)
    progress = [PLAIN_PROGRESS.match(line) for line in proc.stdout.splitlines()]
    steps = [int(m.group(1)) for m in progress if m]
    assert steps and steps[-1] == 30, proc.stdout  # the last step always shows
    assert re.search(r"^\d\d:\d\d:\d\d training simclr \+ small_cnn on synthetic", proc.stdout, re.M)
    assert re.search(r"^\d\d:\d\d:\d\d epoch 0: kNN top-1 ", proc.stdout, re.M)
    token = Path.home() / ".ray" / "auth_token"
    assert f"dashboard http://127.0.0.1:8265 (it asks for the token in {token}" in proc.stdout
    assert stat.S_IMODE(token.stat().st_mode) == 0o600
    for summary in ["finished: 30 steps", "TensorBoard:    tensorboard --logdir", f"logs:           {out / 'logs'}"]:
        assert summary in proc.stdout
    assert f"report:         {out / 'report.html'}" in proc.stdout and (out / "report.html").is_file()
    logs = out / "logs"
    workers = sorted(logs.glob("RayTrainWorker-*.log"))
    assert len(workers) == 2 and (logs / "driver.log").is_file()
    everything = "\n".join(f.read_text() for f in logs.glob("*.log"))
    assert "training simclr + small_cnn" in everything and '@sslrun-event {"step":30' in everything
    hidden = [m for m in NOISE_MARKERS[:5] if m in everything]
    assert hidden, "none of the usual noise was produced, so nothing shows it was kept"
