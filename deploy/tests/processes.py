"""Run the CLI in a child process with torch blocked there too."""

from __future__ import annotations

import socket
import subprocess
import sys

BLOCK_TORCH_THEN_CLI = ("import sys; sys.modules['torch'] = None; sys.modules['torchvision'] = None; "
                        "from stablesdg_line.cli import main; sys.exit(main(sys.argv[1:]))")


def cli_command(*args: str) -> list[str]:
    return [sys.executable, "-c", BLOCK_TORCH_THEN_CLI, *args]


def run_cli(*args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run(cli_command(*args), capture_output=True, text=True, timeout=timeout)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def stop_process(process: subprocess.Popen, grace_s: float = 10) -> None:
    """SIGTERM, then SIGKILL if it has not exited within `grace_s`."""
    process.terminate()
    try:
        process.wait(timeout=grace_s)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(timeout=5)
