"""Evaluation: k-shot strategies (fine-tuning restores the weights), the baseline, the fixed protocol."""

import json

import pytest
import torch

from crnet.commands.evaluate import CRNetPredictor, PrototypeBaseline, evaluate
from crnet.errors import CRNetError
from crnet.model.crnet import build_model
from tests.ddp_worker import MICRO


def batch(shots=3, size=MICRO.input_size, batch_size=2):
    generator = torch.Generator().manual_seed(0)
    masks = torch.zeros(batch_size, shots, size, size, dtype=torch.long)
    masks[..., 8:24, 8:24] = 1
    return {
        "query_image": torch.randn(batch_size, 3, size, size, generator=generator),
        "support_images": torch.randn(batch_size, shots, 3, size, size, generator=generator),
        "support_masks": masks,
    }


def test_finetune_adapts_then_restores_the_weights():
    torch.manual_seed(0)
    model = build_model(MICRO).eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    episode = batch(shots=3)
    averaged = CRNetPredictor(model, torch.device("cpu"), "average")(episode)
    tuned = CRNetPredictor(model, torch.device("cpu"), "finetune", finetune_steps=3, finetune_lr=1e-2)(
        episode
    )
    assert tuned.shape == averaged.shape
    assert not torch.allclose(tuned, averaged)  # the heads really were updated before predicting
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert all(p.grad is None or p.grad.abs().sum() > 0 for p in model.parameters())


def test_finetune_with_one_shot_is_the_plain_prediction():
    """With a single support there is no labelled pair to fine-tune on."""
    model = build_model(MICRO).eval()
    episode = batch(shots=1)
    plain = CRNetPredictor(model, torch.device("cpu"), "average")(episode)
    assert torch.equal(CRNetPredictor(model, torch.device("cpu"), "finetune")(episode), plain)


def test_unknown_strategy_is_a_user_error():
    with pytest.raises(CRNetError, match="strategy"):
        CRNetPredictor(build_model(MICRO), torch.device("cpu"), "vote")


def test_baseline_scores_are_cosines():
    scores = PrototypeBaseline(build_model(MICRO), torch.device("cpu"))(batch(shots=2))
    assert scores.shape == (2, 2, MICRO.feature_size, MICRO.feature_size)
    assert scores.abs().max() <= 1 + 1e-5


@pytest.mark.parametrize("shots", [1, 2])
def test_evaluate_runs_the_fixed_protocol(bench_root, shots):
    torch.manual_seed(0)
    predictor = CRNetPredictor(build_model(MICRO), torch.device("cpu"))
    common = dict(
        fold=0,
        shots=shots,
        input_size=MICRO.input_size,
        episodes=12,
        seed=3,
        batch_size=5,
        workers=0,
        progress=False,
    )
    first = evaluate(predictor, bench_root, **common)
    again = evaluate(predictor, bench_root, **common)
    assert first["miou"] == again["miou"] and first["fbiou"] == again["fbiou"]  # same episodes, same model
    assert 0 <= first["miou"] <= 100 and 0 <= first["fbiou"] <= 100
    assert set(first["per_class"]) <= {"1", "2", "3", "4", "5"}  # fold 0 tests only its novel classes
    assert first["episodes"] == 12


def test_results_table_is_whole_when_not_a_terminal(capsys) -> None:
    """Piped or redirected, the table keeps every column (no wrapping or cutting to 80 columns)."""
    from crnet.commands.cli import print_results

    row = {"fold": 0, "shots": 5, "strategy": "finetune", "episodes": 1000, "miou": 57.31, "fbiou": 76.2}
    rows = [{"method": "CRNet", **row, "seconds": 206.0, "mean_iterations": 3.62}]
    rows.append({"method": "baseline", **row, "strategy": "average", "seconds": 43.0})
    print_results(rows)
    lines = capsys.readouterr().out.splitlines()
    table = [line for line in lines if line.startswith("|")]
    assert len(table) == 4 and len({line.count("|") for line in table}) == 1
    assert table[2] == "| CRNet | 0 | 5 | finetune | 1000 | 57.3 | 76.2 | 206 | 3.62 |"
    assert table[3].endswith("| 43 | - |")


def test_a_class_without_episodes_counts_zero_and_is_named(tmp_path) -> None:
    """Three episodes walk the fake fold's first three pairs (classes 1, 2, 3): 4 and 5 get none."""
    from tests.fake_voc import make_fake_voc

    voc = make_fake_voc(tmp_path / "voc")
    notices = []

    def background(batch):  # predicts background everywhere
        return torch.stack([torch.ones(5, 5), torch.zeros(5, 5)])[None].expand(
            len(batch["class_id"]), -1, -1, -1
        )

    result = evaluate(
        background,
        voc,
        fold=0,
        input_size=33,
        episodes=3,
        min_object_pixels=1,
        progress=False,
        notice=notices.append,
    )
    assert result["classes_without_episodes"] == [4, 5] and result["miou"] == 0.0
    assert result["per_class"] == {str(c): 0.0 for c in (1, 2, 3, 4, 5)}
    assert notices == [
        "classes [4, 5] of fold 0 got no episode in 3: they count 0 in the mIoU (give more --episodes)"
    ]


@pytest.mark.parametrize("fold, warned", [(0, False), (2, True)])
def test_a_fold_the_model_was_trained_on_is_named(fold, warned, bench_root, tmp_path, monkeypatch, capsys):
    """Fold 2's novel classes are among fold 0's training classes: a fold-0 model tested there is not
    tested on unseen classes, and eval says so (it still runs: the user asked for it)."""
    import sys

    from crnet.checkpoint import save_atomic
    from crnet.commands import cli

    torch.manual_seed(0)
    state = {
        "model_config": MICRO.to_dict(),
        "model": build_model(MICRO).state_dict(),
        "train_config": {"fold": 0},
    }
    checkpoint = save_atomic(state, tmp_path / "fold0.pt")
    argv = [
        "crnet",
        "eval",
        str(checkpoint),
        "--data",
        str(bench_root),
        "--fold",
        str(fold),
        "--episodes",
        "2",
    ]
    monkeypatch.setattr(sys, "argv", [*argv, "--device", "cpu", "--no-progress"])
    monkeypatch.setattr(sys, "excepthook", sys.excepthook)  # typer installs its own hook
    try:
        cli.main()
    except SystemExit as done:
        assert done.code in (0, None)
    warnings = [line for line in capsys.readouterr().err.splitlines() if "was trained on fold 0" in line]
    assert len(warnings) == warned, warnings
    assert json.loads((tmp_path / f"eval_fold{fold}_1shot.json").read_text())["trained_fold"] == 0
