"""The learned demo PRM (components.prm_learned): the shipped weights load offline from the package and score
steps, scoring reads the tags the build trained on, a missing model names the rebuild command, and the rebuild
command runs end to end (tiny sizes)."""

from __future__ import annotations

import json
import math

import pytest
import torch

from components import prm_learned, prm_learned_build
from components.prms import LearnedArithPRM

PROBLEM = "(3 + 4) * 5"


def test_shipped_prm_loads_offline_from_the_package_and_scores_each_step():
    assert (prm_learned.DEFAULT_DIR / "model.safetensors").stat().st_size < 5_000_000  # a few MB, in the package
    prm = LearnedArithPRM()
    prm.setup("cpu")
    good = ["3 + 4 = 7\n", "7 * 5 = 35\n", "\\boxed{35}"]
    bad = ["3 + 4 = 9\n", "9 * 5 = 44\n", "\\boxed{44}"]
    scores = prm.score_texts([PROBLEM, PROBLEM], [good, bad])
    assert [len(s) for s in scores] == [3, 3]
    assert all(0.0 <= v <= 1.0 for row in scores for v in row)
    # the shipped weights tell a true equation from its off-by-one twin more often than chance (measured: 62.8% of
    # 309; a head that ignores the equation would be near 50%, ± 2.8% at this size)
    check = prm_learned_build.check_true_against_off_by_one(prm, 100)
    assert check["equations"] == 309 and check["true_above_off_by_one"] > 0.58
    metrics = json.loads((prm_learned.DEFAULT_DIR / "prm_train.json").read_text())
    assert metrics["held_out"]["steps"] > 1000 and metrics["train"]["steps"] == metrics["train"]["max_steps"]


def test_scores_are_the_head_read_at_the_step_tags_the_build_trains_on():
    prm = LearnedArithPRM()
    prm.setup("cpu")
    steps = ["3 + 4 = 7\n", "7 * 5 = 30\n", "\\boxed{30}"]
    ids, mask, labels = prm_learned_build.encode(prm.tokenizer, prm.tag_id, [(PROBLEM, steps, [1.0, 0.0, 0.5])])
    with torch.no_grad():
        probs = torch.softmax(prm.model(input_ids=ids, attention_mask=mask).logits, -1)[0, :, 1]
    at = (labels[0] >= 0).nonzero().flatten()
    assert labels[0, at].tolist() == [1.0, 0.0, 0.5]
    assert prm.score_texts([PROBLEM], [steps])[0] == pytest.approx(probs[at].tolist(), abs=1e-6)
    assert prm.build_text(PROBLEM, ["a<step>b\n"]) == "Q: (3 + 4) * 5\nA:\nab\n<step>"  # a tag inside a step is removed


def test_soft_cross_entropy_hand_value():
    logits = torch.tensor([[[0.0, 0.0], [0.0, math.log(3.0)], [5.0, 1.0]]])  # P(correct) = 0.5, 0.75, off-tag
    labels = torch.tensor([[1.0, 0.5, -1.0]])
    # -(log 0.5 + 0.5 log 0.75 + 0.5 log 0.25) / 2
    expected = -(math.log(0.5) + 0.5 * math.log(0.75) + 0.5 * math.log(0.25)) / 2
    assert prm_learned_build.soft_ce(logits, labels).item() == pytest.approx(expected, abs=1e-6)
    assert prm_learned_build.split_steps("1 + 2 = 3\n\\boxed{3}") == ["1 + 2 = 3\n", "\\boxed{3}"]


def test_missing_weights_name_the_rebuild_command(tmp_path):
    with pytest.raises(FileNotFoundError, match="python -m components.prm_learned_build"):
        LearnedArithPRM(str(tmp_path)).setup("cpu")


def test_rebuild_command_runs_end_to_end_at_tiny_size(tmp_path, monkeypatch):
    from prpo_lightning.demo import policy

    monkeypatch.setenv("PRPO_CACHE", str(tmp_path / "cache"))  # a tiny warm start, not the cached demo policy
    monkeypatch.setattr(policy, "SFT_DEFAULTS", dict(policy.SFT_DEFAULTS, max_steps=2, eval_every=2, n_dev=2,
                                                     n_held_out=2, batch_size=4))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        metrics = prm_learned_build.build(tmp_path / "prm", train_problems=4, samples=2, eval_samples=1, max_steps=2,
                                          batch_size=4, held_out_problems=4)
    finally:
        torch.set_num_threads(threads)
    assert metrics["train"]["steps"] == 2 and metrics["data"]["train_completions"] >= 1
    assert json.loads((tmp_path / "prm" / "prm_train.json").read_text())["held_out"] == metrics["held_out"]
    prm = LearnedArithPRM(str(tmp_path / "prm"))
    prm.setup("cpu")
    scores = prm.score_texts([PROBLEM], [["3 + 4 = 7\n", "\\boxed{7}"]])
    assert len(scores[0]) == 2 and all(0.0 <= v <= 1.0 for v in scores[0])
