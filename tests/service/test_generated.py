"""The committed stubs in service/generated/ are exactly what `python proto/generate.py` writes."""
import subprocess
import sys
from pathlib import Path

GENERATOR = Path(__file__).resolve().parents[2] / "proto" / "generate.py"


def test_generated_stubs_are_current():
    done = subprocess.run([sys.executable, str(GENERATOR), "--check"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, f"{done.stderr.strip()}; run `python proto/generate.py` and commit service/generated/"
    assert "generated stubs are current" in done.stdout
