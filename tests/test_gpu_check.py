"""benchmarks/gpu_check.py's CPU path on tiny shapes: it runs every section and writes one
JSON with the fields the lead reads (no timing is asserted)."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
torch.set_num_threads(1)


def test_gpu_check_tiny_writes_every_section(tmp_path):
    import gpu_check
    out = tmp_path / "check.json"
    gpu_check.main(["--tiny", "--device", "cpu", "--seeds", "0,1", "--loop-sample", "2", "--out", str(out)])
    d = json.loads(out.read_text())
    assert d["tiny"] and d["device"] == "cpu" and not (tmp_path / "check.json.part").exists()
    sec = d["sections"]
    assert sec["matmul_gflops"]["fp32"] > 0 and sec["matmul_gflops"]["tf32"] is None
    for shape in ("tiny10", "tiny100"):
        sw = sec[f"sweep_{shape}"]
        assert sw["eager"]["mode"] == "off" and sw["graphs"]["mode"] == "on"
        assert sw["eager"]["runs"] == sw["graphs"]["runs"] > 0
        assert sw["graphs_max_abs_acc_diff"] == 0          # the buffer path is exact on a CPU
        assert sw["merged"]["merge"] == "on" and sw["merged"]["runs"] == sw["eager"]["runs"]
        assert sw["merged_max_abs_acc_diff"] is not None
        assert sw["streams"]["streams"] == "on" and sw["streams_max_abs_acc_diff"] == 0   # interleaving: exact
        assert sw["merged_streams"]["merge"] == sw["merged_streams"]["streams"] == "on"
        loop = sec[f"plain_loop_{shape}"]
        assert loop["total_s"] > 0 and loop["timed_configs"] == 2 and loop["configs"] == 10
    comp = sec["compile_tiny10"]                              # on a CPU: the buffer path, eagerly
    assert comp["compiled"]["mode"] == "compile" and comp["compiled_max_abs_acc_diff"] == 0
    assert comp["hand_capture_wall_s"] > 0
    prec = sec["precision_tiny100"]
    assert "wall_s" in prec["fp32"] and "wall_s" in prec["bf16"] and "tf32" in prec["tf32"]["refused"]
    im = sec["imnet"]
    assert im["one_epoch"]["epochs_cap"] == 1 and im["full_sweep_estimate_s"] > 0
    assert "wall_s" in im["source_epochs"] and im["plain_loop"]["total_s"] > 0
