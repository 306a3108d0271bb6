"""DDP pretraining with torchrun: 2 CPU processes on the gloo backend, through the real CLI."""

from __future__ import annotations

import csv
import os
import socket
import subprocess
import sys

import torch

from toydata import write_toy_dataset  # benchmarks/toydata.py (conftest puts benchmarks/ on the path)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_torchrun_two_gloo_processes(tmp_path):
    data = write_toy_dataset(tmp_path / "data", n_lesion=3, n_healthy=1, shape=(20, 20, 12), seed=4)
    run = tmp_path / "run"
    env = dict(os.environ, OMP_NUM_THREADS="1")  # 2 processes x 1 thread on the 2 CI cores
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={_free_port()}",
           "-m", "lesiondiffusion", "pretrain", "vqgan", "--data", str(data), "-o", str(run), "--steps", "2",
           "--adv-warmup", "0", "--patch", "16", "16", "16", "--batch-size", "1", "--workers", "0",
           "--no-progress", "--device", "cpu", "--ema", "0.9", "--preview-every", "0", "--log-every", "1"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-4000:]
    # the engine all-gathers parameter checksums at the end and fails the run if ranks diverged
    assert "vqgan: weights identical on all 2 ranks" in log
    assert proc.stdout.count("vqgan: 2 steps done") == 1  # only rank 0 reports
    ckpt = torch.load(run / "checkpoint.pt", map_location="cpu", weights_only=True)
    assert ckpt["world"] == 2 and ckpt["step"] == 2 and len(ckpt["rng"]) == 2
    assert not torch.equal(ckpt["rng"][0]["torch"], ckpt["rng"][1]["torch"])  # ranks draw different noise
    rows = list(csv.DictReader((run / "metrics.csv").open()))
    assert [r["step"] for r in rows if r["name"] == "recon"] == ["1", "2"]  # one row per step, not per rank
    assert all(torch.isfinite(torch.tensor(float(r["value"]))) for r in rows)
    assert (run / "bundle" / "vqgan" / "model.safetensors").exists()
