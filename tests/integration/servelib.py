"""`petals serve` as a real process for tests: started like a user would, stopped at teardown."""
from __future__ import annotations

import re
import signal
import subprocess
import sys
import threading
from collections import deque
from pathlib import Path

READY_RE = re.compile(r"ready at (http://\S+)/v1\b")


class ServeProcess:
    def __init__(self, model: Path, initial_peers: list[str], extra: list[str] | None = None,
                 timeout: float = 120.0) -> None:
        self.args = [sys.executable, "-m", "petals_client.cli", "serve", "--model", str(model),
                     "--initial-peers", *initial_peers, "--port", "0", *(extra or [])]
        self.process = subprocess.Popen(self.args, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                        stderr=subprocess.PIPE, text=True, start_new_session=True)
        self.log: deque[str] = deque(maxlen=300)
        self.url = ""
        ready = threading.Event()

        def read(stream, ready_line: bool) -> None:
            for line in stream:
                self.log.append(line.rstrip("\n"))
                match = READY_RE.search(line) if ready_line else None
                if match and not ready.is_set():
                    self.url = match.group(1)
                    ready.set()
            ready.set()

        threading.Thread(target=read, args=(self.process.stdout, True), daemon=True).start()
        threading.Thread(target=read, args=(self.process.stderr, False), daemon=True).start()
        if not ready.wait(timeout) or not self.url:
            self.stop()
            raise RuntimeError(f"petals serve did not become ready (exit {self.process.poll()}):\n"
                               + "\n".join(self.log))

    @property
    def base_url(self) -> str:
        return f"{self.url}/v1"

    def stop(self) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                return self.process.wait(20)
            except subprocess.TimeoutExpired:
                self.process.kill()
        return self.process.wait()
