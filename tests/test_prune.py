"""prune: structural pruning of the committed digits CNN changes shapes and MACs, and still converts."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn
from typer.testing import CliRunner

from visionserve.service.cli import app

ROOT = Path(__file__).resolve().parent.parent
DIGITS = ROOT / "tests" / "data" / "digits"


def digits_model() -> nn.Module:
    from examples.train_digits import digits_net

    m = digits_net()
    m.load_state_dict(torch.load(DIGITS / "digits_cnn.pt", weights_only=True))
    return m.eval()


def conv_channels(m: nn.Module) -> list[int]:
    return [c.out_channels for c in m.modules() if isinstance(c, nn.Conv2d)]


def test_pruning_shrinks_channels_and_macs_but_keeps_the_head() -> None:
    from visionserve.quantize.prune import count, prune_model

    model = digits_model()
    before, macs0 = conv_channels(model), count(model, 32)[0]
    pruned = prune_model(model, 32, ratio=0.5, target_macs=None, round_to=8)
    after, macs1 = conv_channels(pruned), count(pruned, 32)[0]
    assert all(a < b for a, b in zip(after, before)), (before, after)
    assert all(a % 8 == 0 for a in after)
    assert macs1 < 0.5 * macs0
    assert pruned.classifier.out_features == 10  # the head keeps its classes
    assert pruned(torch.randn(2, 3, 32, 32)).shape == (2, 10)


def test_target_macs_is_reached() -> None:
    from visionserve.quantize.prune import count, prune_model

    model = digits_model()
    macs0 = count(model, 32)[0]
    prune_model(model, 32, ratio=None, target_macs=0.6, round_to=8)
    assert count(model, 32)[0] <= 0.6 * macs0


def test_prune_cli_finetunes_saves_and_the_result_converts(tmp_path: Path) -> None:
    from visionserve.convert.pipeline import ConvertOptions, convert_model
    from visionserve.convert.sources import load_source
    from visionserve.service.manifest import Preprocess

    out, ts = tmp_path / "pruned.pt", tmp_path / "pruned.ts"
    r = CliRunner().invoke(app, [
        "prune", "--module", "examples.train_digits:digits_net", "--weights", str(DIGITS / "digits_cnn.pt"),
        "--input-size", "32", "--ratio", "0.5", "--finetune", str(DIGITS / "test"), "--epochs", "1",
        "--resize", "32", "--mean", "0.5,0.5,0.5", "--std", "0.5,0.5,0.5", "-o", str(out), "--torchscript", str(ts),
    ])
    assert r.exit_code == 0, r.output
    assert "MACs" in r.output and "batch 8" in r.output
    whole = torch.load(out, weights_only=False)
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(whole.eval()(x), torch.jit.load(str(ts))(x), atol=1e-5)  # the same network
    assert conv_channels(whole)[0] < 16
    entry = convert_model(
        load_source(torchscript=ts),
        ConvertOptions(name="pruned", repository=tmp_path / "repo", input_size=(32, 32),
                       preprocess=Preprocess(resize=32, mean=(0.5,) * 3, std=(0.5,) * 3), exporter="legacy"),
    )
    assert entry.manifest.provenance.parity is not None  # convert proved it against PyTorch


def test_prune_rejects_both_or_neither_amount() -> None:
    from visionserve.quantize.prune import PruneError, prune_model

    with pytest.raises(PruneError, match="exactly one"):
        prune_model(digits_model(), 32, ratio=0.3, target_macs=0.5)
    with pytest.raises(PruneError, match="exactly one"):
        prune_model(digits_model(), 32, ratio=None, target_macs=None)
