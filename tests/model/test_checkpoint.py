"""Official containers load strictly; pos_embed interpolation; convert round trip (docs/model.md §3, 1.1, 5.4)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from albef.cli import main as albef_main
from albef.model.checkpoint import CheckpointError, load_strict, official_to_albef
from albef.model.config import get_config
from albef.model.factory import create_model
from albef.model.vit import interpolate_pos_embed
from tests.helpers.official_layout import official_state


@pytest.fixture(scope="module")
def base_model():
    torch.manual_seed(0)
    return create_model("albef-base")


@pytest.mark.parametrize("container", ["flat", "pretrain"])
def test_base_official_container_loads_exactly(base_model, container: str) -> None:
    cfg = get_config("albef-base")
    raw = official_state(cfg, container)
    state = raw["model"] if container == "pretrain" else raw
    mapped = official_to_albef(state, base_model)
    expected = set(base_model.state_dict())
    assert set(mapped) == expected  # zero missing, zero unexpected
    load_strict(base_model, mapped)
    ours = base_model.state_dict()
    prefix = "text_encoder.bert." if container == "pretrain" else "text_encoder."
    for key in ("text_encoder.encoder.layer.7.crossattention.self.key.weight", "itm_head.weight", "temp"):
        src = key.replace("text_encoder.", prefix)
        assert torch.equal(ours[key], state[src]), key
    pos = ours["visual_encoder.pos_embed"]
    assert pos.shape == (1, 577, 768)
    assert torch.equal(pos[:, 0], state["visual_encoder.pos_embed"][:, 0])  # CLS row kept


def test_key_errors_name_the_keys(base_model) -> None:
    state = official_state(get_config("albef-base"), "flat")
    extra = dict(state, **{"text_encoder.encoder.layer.3.crossattention.self.query.weight": torch.zeros(1)})
    with pytest.raises(
        CheckpointError, match=r"unexpected keys \(1\): text_encoder\.encoder\.layer\.3\.crossattention"
    ):
        load_strict(base_model, official_to_albef(extra, base_model))
    missing = {k: v for k, v in state.items() if k != "itm_head.bias"}
    with pytest.raises(CheckpointError, match=r"missing keys \(1\): itm_head\.bias"):
        load_strict(base_model, official_to_albef(missing, base_model))


def _bicubic_reference(grid: np.ndarray, out: int) -> np.ndarray:
    """Separable bicubic (Keys, A=-0.75), align_corners=False, border-clamped taps, no antialias, float64."""

    def weights(t: float) -> list[float]:
        a = -0.75

        def near(x: float) -> float:
            return ((a + 2) * x - (a + 3)) * x * x + 1

        def far(x: float) -> float:
            return ((a * x - 5 * a) * x + 8 * a) * x - 4 * a

        return [far(t + 1), near(t), near(1 - t), far(2 - t)]

    def resize_axis(x: np.ndarray, axis: int) -> np.ndarray:
        n = x.shape[axis]
        scale = n / out
        res = []
        for o in range(out):
            src = (o + 0.5) * scale - 0.5
            i0 = int(np.floor(src))
            w = weights(src - i0)
            acc = sum(w[j] * np.take(x, min(max(i0 - 1 + j, 0), n - 1), axis=axis) for j in range(4))
            res.append(acc)
        return np.stack(res, axis=axis)

    return resize_axis(resize_axis(grid, 0), 1)


def test_pos_embed_interpolation_matches_independent_bicubic() -> None:
    torch.manual_seed(3)
    pos = torch.randn(1, 257, 8)
    new = interpolate_pos_embed(pos, 576)
    assert new.shape == (1, 577, 8)
    assert torch.equal(new[:, 0], pos[:, 0])
    grid = pos[0, 1:].reshape(16, 16, 8).double().numpy()
    ref = _bicubic_reference(grid, 24).reshape(576, 8)
    assert np.abs(new[0, 1:].double().numpy() - ref).max() < 1e-5
    # antialiased resampling (timm's default) is a different function: the spec's warning holds
    aa = (
        torch.nn.functional.interpolate(
            pos[:, 1:].reshape(1, 16, 16, 8).permute(0, 3, 1, 2),
            size=(24, 24),
            mode="bicubic",
            antialias=True,
        )
        .permute(0, 2, 3, 1)
        .reshape(1, 576, 8)
    )
    assert (aa - new[:, 1:]).abs().max() > 1e-3


def test_convert_then_reload_is_bit_identical(tmp_path: Path, tokenizer) -> None:
    cfg = get_config("albef-tiny")
    raw = official_state(cfg, "pretrain")
    pth = tmp_path / "ALBEF_tiny.pth"
    torch.save(raw, pth)
    out = tmp_path / "converted"
    # In-process: the same entry point as the console script, without a second torch import.
    assert albef_main(["convert", str(pth), str(out), "--config", "albef-tiny"]) == 0
    direct = create_model("albef-tiny", pth)
    reloaded = create_model(None, out)
    pixels = torch.randn(2, 3, 96, 96)
    ids, mask = (torch.from_numpy(a) for a in tokenizer(["a red circle", "two blue squares above a dog"]))
    with torch.no_grad():
        a = direct.encode_image(pixels), direct.encode_text(ids, mask)
        b = reloaded.encode_image(pixels), reloaded.encode_text(ids, mask)
        la = direct.itm_logits(a[1][1], mask, a[0][1])
        lb = reloaded.itm_logits(b[1][1], mask, b[0][1])
    for x, y in zip([*a[0], *a[1], la], [*b[0], *b[1], lb], strict=True):
        assert torch.equal(x, y)


def test_cli_reports_bad_checkpoint(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cfg = get_config("albef-tiny")
    state = official_state(cfg, "flat")
    del state["vision_proj.weight"]
    pth = tmp_path / "broken.pth"
    torch.save(state, pth)
    assert albef_main(["convert", str(pth), str(tmp_path / "o"), "--config", "albef-tiny"]) == 1
    assert "missing keys (1): vision_proj.weight" in capsys.readouterr().err
    assert not (tmp_path / "o" / "model.safetensors").exists()
    assert albef_main(["convert", str(tmp_path / "nope.pth"), str(tmp_path / "o")]) == 1
    assert "not found" in capsys.readouterr().err


def test_info_summarises_a_checkpoint(
    tmp_path: Path, tiny_checkpoint: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert albef_main(["info", str(tiny_checkpoint)]) == 0
    out = capsys.readouterr().out
    assert "albef-tiny" in out and "visual_encoder" in out
    pth = tmp_path / "p.pth"
    torch.save(official_state(get_config("albef-tiny"), "pretrain"), pth)
    assert albef_main(["info", str(pth), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["kind"] == "official-pretrain" and info["has_momentum"] and info["has_queues"]
    assert info["pos_embed"] == [1, 17, 128]
