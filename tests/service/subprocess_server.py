"""A `semguard serve` subprocess's gRPC port, read from its start-up log line."""
import re
import subprocess
import time


def serving_port(proc: subprocess.Popen, timeout_s: float = 120) -> int:
    """The port `semguard serving ... on 127.0.0.1:PORT` names on proc's stderr (text mode); fails with the log."""
    port, deadline, log = None, time.monotonic() + timeout_s, []
    while port is None and time.monotonic() < deadline:
        line = proc.stderr.readline()
        if not line:
            break
        log.append(line)
        if m := re.search(r"semguard serving .* on 127\.0\.0\.1:(\d+)", line):
            port = int(m.group(1))
    assert port, "server did not start:\n" + "".join(log)
    return port
