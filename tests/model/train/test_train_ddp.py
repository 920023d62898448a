"""The trainer under ``torchrun --nproc_per_node=2`` on CPU (gloo): the queues hold both ranks' features."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import torch


def test_torchrun_two_processes_fill_queues_by_all_gather(tmp_path: Path):
    from albef.model.data.synth import generate

    data = tmp_path / "data"
    generate(data, 12, seed=5, size=48, progress=False)
    recipe = tmp_path / "ddp.yaml"
    recipe.write_text(
        f"""
model: {{image_res: 32}}
data: {{train: [{data / "train.json"}]}}
train: {{batch_size: 3, max_steps: 3, queue_size: 12, threads: 1}}
optim: {{lr: 1.0e-3}}
log: {{every: 1}}
eval: {{split: null}}
debug: {{dump_queues: true}}
"""
    )
    out = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "ALBEF_LOG_LEVEL": "WARNING"}
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node=2",
        "-m",
        "albef.cli",
        "train",
        "--config",
        str(recipe),
        "--out",
        str(out),
        "--no-progress",
    ]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]

    def dump(rank: int, step: int) -> dict:
        return torch.load(out / "debug" / f"rank{rank}-step{step:06d}.pt", weights_only=False)

    for step in range(3):
        r0, r1 = dump(0, step), dump(1, step)
        # every rank holds the same queues ...
        for key in ("image_queue", "text_queue", "idx_queue"):
            assert torch.equal(r0[key], r1[key]), (step, key)
        # ... in which this step's 2 x 3 columns are rank 0's momentum features, then rank 1's
        cols = slice(6 * step % 12, 6 * step % 12 + 6)
        gathered_img = torch.cat([r0["image_feat_m"], r1["image_feat_m"]]).T
        gathered_txt = torch.cat([r0["text_feat_m"], r1["text_feat_m"]]).T
        assert torch.allclose(r0["image_queue"][:, cols], gathered_img, atol=1e-6)
        assert torch.allclose(r0["text_queue"][:, cols], gathered_txt, atol=1e-6)
        assert r0["idx_queue"][0, cols].tolist() == r0["idx"].tolist() + r1["idx"].tolist()
        assert r0["queue_ptr"] == (6 * step + 6) % 12
        # the ranks trained on different data (disjoint shards)
        assert not torch.allclose(r0["image_feat_m"], r1["image_feat_m"])
    # rank 0 wrote the final weights and one metrics line per step (losses averaged over both ranks)
    assert (out / "final" / "model.safetensors").is_file()
    lines = (out / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(ln)["step"] for ln in lines] == [1, 2, 3]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["world_size"] == 2
