"""`semguard attack query` against a live `semguard serve` (a subprocess, the embedded world's guard with the
query defence in block mode): every query goes through tritonclient; results are written per image, the
defence notices HopSkipJump's near-duplicate queries, and a rerun resumes instead of attacking again."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from semguard.cli import main
from tests.service.subprocess_server import serving_port

pytestmark = pytest.mark.slow
KEY = "x-api-key"


@pytest.fixture(scope="module")
def world_bundle(tmp_path_factory):
    """(world cache, bundle) of the embedded world: a gaussian guard (no attack images needed to calibrate)."""
    root = tmp_path_factory.mktemp("query")
    cache, bundle = root / "world", root / "bundle"
    assert main(["detector", "calibrate", "--out", str(bundle), "--world-cache", str(cache), "--method", "gaussian",
                 "--max-images", "300", "--allow-few-images", "--quiet"]) == 0
    return cache, bundle


def test_attack_query_runs_through_a_live_server_and_resumes(world_bundle, tmp_path, capsys):
    cache, bundle = world_bundle
    cmd = [sys.executable, "-m", "semguard.cli", "serve", "--bundle", str(bundle), "--host", "127.0.0.1",
           "--grpc-port", "0", "--no-metrics", "--torch-threads", "1", "--query-defence", "block",
           "--query-client-key", KEY]
    server = subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True)
    try:
        port = serving_port(server)
        model = json.loads((bundle / "bundle.json").read_text())["model_name"]
        argv = ["attack", "query", "--address", f"127.0.0.1:{port}", "--model", model, "--world-cache", str(cache),
                "--attack", "hopskipjump", "--max-queries", "150", "--n-images", "2", "--client-header", KEY,
                "--out", str(tmp_path / "out")]
        assert main(argv) == 0
        assert "(2 attacked, 0 already done)" in capsys.readouterr().out
        rows = [json.loads(line) for line in (tmp_path / "out" / "results.jsonl").read_text().splitlines()]
        assert len(rows) == 2 and len({r["index"] for r in rows}) == 2
        for row in rows:
            assert 1 <= row["queries"] <= 150 and row["norm"] == "l2"
            assert row["success"] == (row["queries_to_success"] is not None)
            assert (row["distortion"] is None) == (row["final_prediction"] is None)
        # the block-mode defence notices the attack (its gradient estimates are near-copies of one image)
        assert any(r["queries_to_detection"] is not None and r["refused"] > 0 for r in rows)
        assert main(argv) == 0  # resumed: nothing attacked again
        assert "(0 attacked, 2 already done)" in capsys.readouterr().out
        with pytest.raises(SystemExit, match="other parameters"):
            main(argv[:-2] + ["--max-queries", "99", "--out", str(tmp_path / "out")])
    finally:
        server.terminate()
        server.wait(30)
