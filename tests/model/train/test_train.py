"""The trainer: resume equals an uninterrupted run, bad items are skipped and reported, CLI errors."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch


@pytest.fixture(scope="module")
def synth_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from albef.model.data.synth import generate

    root = tmp_path_factory.mktemp("synth") / "data"
    generate(root, 16, seed=3, size=48, progress=False)
    return root


def _cfg(data: Path, **over: str):
    from albef.model.train.settings import load_config

    base = {
        "model.image_res": "32",
        "data.train": f"[{data / 'train.json'}]",
        "train.batch_size": "4",
        "train.grad_accum": "2",
        "train.max_steps": "8",
        "train.queue_size": "16",
        "train.threads": "1",
        "optim.lr": "1e-3",
        "optim.warmup_steps": "2",
        "checkpoint.every": "100",
        "log.every": "1",
        "eval.split": "null",
    }
    base.update(over)
    return load_config(None, [f"{k}={v}" for k, v in base.items()])


def _final_state(folder: Path) -> dict[str, torch.Tensor]:
    from albef.model.checkpoint import read_albef

    return read_albef(folder)[1]


def test_resumed_run_equals_uninterrupted_run(synth_data: Path, tmp_path: Path):
    from albef.model.train.trainer import Trainer

    full = Trainer(_cfg(synth_data), tmp_path / "full", progress=False).run()
    assert full["steps"] == 8
    # same run, interrupted after 5 steps (a checkpoint at 5; 6 steps make an epoch: the resume crosses it)
    cut = _cfg(synth_data, **{"checkpoint.every": "5", "debug.stop_after": "5"})
    part = Trainer(cut, tmp_path / "cut", progress=False).run()
    assert part == {"step": 5, "stopped": True}
    assert (tmp_path / "cut" / "checkpoints" / "latest").read_text().strip() == "step-000005"
    assert not (tmp_path / "cut" / "final").exists()
    resumed = Trainer(
        _cfg(synth_data, **{"checkpoint.every": "5"}), tmp_path / "cut", resume=True, progress=False
    ).run()
    assert resumed["trained_steps_this_run"] == 3
    a, b = _final_state(tmp_path / "full" / "final"), _final_state(tmp_path / "cut" / "final")
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    # momentum weights and queues of the last checkpoints agree as well
    s_full = torch.load(tmp_path / "full" / "checkpoints" / "step-000008" / "state.pt", weights_only=False)
    s_cut = torch.load(tmp_path / "cut" / "checkpoints" / "step-000008" / "state.pt", weights_only=False)
    for key, value in s_full["queues"].items():
        assert torch.equal(value, s_cut["queues"][key]), key
    for key, value in s_full["momentum"].items():
        assert torch.equal(value, s_cut["momentum"][key]), key
    # metrics: one line per step, no duplicates after the resume
    steps = [json.loads(ln)["step"] for ln in (tmp_path / "cut" / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, 9))
    first = json.loads((tmp_path / "full" / "metrics.jsonl").read_text().splitlines()[0])
    assert {"loss_itc", "loss_itm", "lr", "samples_per_s", "alpha"} <= first.keys()
    last = json.loads((tmp_path / "full" / "metrics.jsonl").read_text().splitlines()[-1])
    assert 0 < first["alpha"] < 0.1 and last["alpha"] == pytest.approx(0.4)  # ramp over epoch 0


def test_training_moves_weights_and_skips_bad_images(synth_data: Path, tmp_path: Path):
    from albef.model.train.trainer import Trainer

    # a copy of the data set with one corrupt image and one missing image
    data = tmp_path / "data"
    (data / "images").mkdir(parents=True)
    rows = json.loads((synth_data / "train.json").read_text())
    for src in (synth_data / "images").iterdir():
        (data / "images" / src.name).write_bytes(src.read_bytes())
    corrupt = data / rows[0]["image"]
    corrupt.write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    rows.append({"image": "images/missing.png", "caption": "a red circle", "image_id": "gone"})
    (data / "train.json").write_text(json.dumps(rows))
    n_bad_rows = sum(1 for r in rows if r["image"] == rows[0]["image"]) + 1
    cfg = _cfg(data, **{"train.max_steps": "2", "eval.split": "null"})
    out = tmp_path / "run"
    summary = Trainer(cfg, out, progress=False).run()
    assert summary["steps"] == 2
    assert summary["skipped_items"] == n_bad_rows
    assert summary["pairs"] == len(rows) - n_bad_rows
    from albef.model.factory import create_model
    from albef.model.train.trainer import init_weights

    trained = create_model(None, out / "final")
    torch.manual_seed(42)  # the trainer's initialisation (seed 42)
    init = create_model("albef-tiny", image_res=32)
    init_weights(init)
    assert not torch.equal(trained.itm_head.weight, init.itm_head.weight)


def test_dataset_substitutes_an_item_that_fails_at_load_time(synth_data: Path):
    from albef.model.config import get_config
    from albef.model.data.annotations import PairItem
    from albef.model.train.dataset import AugmentConfig, PairDataset, TrainTransform

    img = next((synth_data / "images").iterdir())
    items = [
        PairItem(Path("/nonexistent.png"), "a", "x", "f.json:[0]"),
        PairItem(img, "b", "y", "f.json:[1]"),
    ]
    cfg = get_config("albef-tiny")
    ds = PairDataset(items, [0, 1], TrainTransform(32, cfg.mean, cfg.std, AugmentConfig()), seed=0)
    sample = ds[(0, 0)]
    assert sample["caption"] == "b" and sample["idx"] == 1
    assert (
        len(sample["bad"]) == 1
        and "f.json:[0]" in sample["bad"][0]
        and "/nonexistent.png" in sample["bad"][0]
    )
    assert sample["image"].shape == (3, 32, 32)
    # augmentation is a function of (seed, epoch, index) only
    assert torch.equal(ds[(3, 1)]["image"], ds[(3, 1)]["image"])
    assert not torch.equal(ds[(3, 1)]["image"], ds[(4, 1)]["image"])


def test_transform_keeps_orientation_when_flip_is_off():
    from PIL import Image

    from albef.model.config import CLIP_MEAN, CLIP_STD
    from albef.model.train.dataset import AugmentConfig, TrainTransform

    img = Image.new("RGB", (64, 64), (255, 255, 255))
    img.paste((255, 0, 0), (0, 0, 16, 64))  # a red band on the left
    aug = AugmentConfig(crop_scale=(0.9, 1.0), hflip=False, randaug_n=0)
    t = TrainTransform(32, CLIP_MEAN, CLIP_STD, aug)
    for seed in range(20):
        x = t(img, random.Random(seed))
        assert x[1, :, :4].mean() < x[1, :, -4:].mean()  # green channel low on the left (red band)
    flips = TrainTransform(32, CLIP_MEAN, CLIP_STD, AugmentConfig(crop_scale=(0.9, 1.0), randaug_n=0))
    flipped = sum(bool(flips(img, random.Random(s))[1, :, :4].mean() > 0) for s in range(40))
    assert 5 < flipped < 35


def test_sharding_is_deterministic_and_disjoint():
    from albef.model.train.dataset import ShardedBatches

    r0, r1 = ShardedBatches(50, 4, 2, 0, seed=1), ShardedBatches(50, 4, 2, 1, seed=1)
    assert r0.num_batches == 6
    b0, b1 = list(r0.batches(2)), list(r1.batches(2))
    ids0 = {i for b in b0 for _, i in b}
    ids1 = {i for b in b1 for _, i in b}
    assert not ids0 & ids1 and len(ids0) == len(ids1) == 24
    assert b0 == list(ShardedBatches(50, 4, 2, 0, seed=1).batches(2))
    assert list(r0.batches(2, start=4)) == b0[4:]
    assert b0 != list(r0.batches(3))


def test_cli_errors_are_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str], synth_data: Path):
    from albef.cli import main

    assert main(["train", "--config", str(tmp_path / "nope.yaml")]) == 2
    assert "config file not found" in capsys.readouterr().err
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"data:\n  train: [{synth_data / 'train.json'}]\nmodel: {{image_res: 32}}\n")
    assert main(["train", "--config", str(recipe), "train.bacth_size=4"]) == 2
    assert "unknown config key 'train.bacth_size'" in capsys.readouterr().err
    assert (
        main(
            [
                "train",
                "--config",
                str(recipe),
                "--out",
                str(tmp_path / "o"),
                "train.batch_size=3",
                "train.queue_size=16",
            ]
        )
        == 1
    )
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "queue_size 16 must be divisible by the global batch 3" in err


def test_scratch_warmup_then_albef_objectives(synth_data: Path, tmp_path: Path):
    from albef.model.factory import create_model
    from albef.model.train.trainer import Trainer

    cfg = _cfg(
        synth_data,
        **{
            "train.max_steps": "3",
            "train.grad_accum": "1",
            "train.scratch_warmup_steps": "2",
            "train.temp_after_warmup": "0.2",
            "model.temp": "0.6",
        },
    )
    Trainer(cfg, tmp_path / "run", progress=False).run()
    rows = [json.loads(ln) for ln in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["loss_itm"] for r in rows[:2]] == [0.0, 0.0] and rows[2]["loss_itm"] > 0
    assert rows[0]["temp"] == pytest.approx(0.6, abs=0.01)
    model = create_model(None, tmp_path / "run" / "final")
    assert model.temp.item() == pytest.approx(0.2, abs=0.01)  # reset when the warm-up ended, then one step
    state = torch.load(tmp_path / "run" / "checkpoints" / "step-000003" / "state.pt", weights_only=False)
    assert int(state["queues"]["queue_ptr"]) == 4  # only the step after the warm-up enqueued (batch 4)


def test_bf16_is_refused_on_a_cpu_without_native_bf16(synth_data: Path, tmp_path: Path, monkeypatch) -> None:
    """train.bf16 on a CPU whose bf16 matmul is far slower than fp32 stops before any work, naming the CPU.
    (This CPU's probe is made to fail by raising the bar: the decision path is the real one.)"""
    from albef.model import precision
    from albef.model.precision import UnsupportedDtypeError, probe_dtype
    from albef.model.train.trainer import Trainer

    fp32 = probe_dtype("float32")
    assert fp32["native"] and fp32["gflops"] > 0
    monkeypatch.setattr(precision, "NATIVE_FRACTION", 1e6)
    with pytest.raises(
        UnsupportedDtypeError, match=r"train.bf16=true: no native bfloat16 matmul on this CPU"
    ):
        Trainer(_cfg(synth_data, **{"train.bf16": "true"}), tmp_path / "run", progress=False).run()
    assert not (tmp_path / "run" / "metrics.jsonl").exists()
