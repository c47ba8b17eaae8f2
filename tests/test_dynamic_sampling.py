"""Dynamic sampling (DAPO, ``model.sampling.dynamic_sampling``): which groups are dropped (both criteria, by prompt
id), concatenation of rounds, the extra-prompt draw, the refill loop in tiny training runs (rounds, drops, prompts
consumed, final batch size), exhausted rounds, exact resume and 2-step CLI runs."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import lightning as L
import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from test_resume import GroupNormAligner, ToyPrompts, make_module, make_trainer, tokenizer_dir
from test_skips import deadline as time_limit  # fails the test instead of hanging

from prpo_lightning.batch import RolloutBatch, StepContext
from prpo_lightning.config import DynamicSamplingConfig
from prpo_lightning.rollout.dynamic_sampling import (
    _Filler,
    concat_rollouts,
    draw_seed,
    ordered_group_ids,
    signal_mask,
)
from prpo_lightning.module import PRPOModule
from prpo_lightning.config import SamplingConfig
from prpo_lightning.scoring.verifier import OutcomeVerifier, Verdict, VerdictStatus


def _batch(ids: list[int], rewards: list[float], adv: list[list[float]] | None = None, t: int = 3,
           p: int = 2) -> RolloutBatch:
    b = len(ids)
    lengths = [t] * b
    mask = torch.tensor([[j < n for j in range(t)] for n in lengths])
    return RolloutBatch(
        prompt_ids=torch.arange(b * p).view(b, p), prompt_mask=torch.ones(b, p, dtype=torch.long),
        completion_ids=torch.arange(b * t).view(b, t) + 100, completion_mask=mask,
        group_ids=torch.tensor(ids), problems=[f"p{i}" for i in ids], answers=[str(i) for i in ids],
        completions=[f"c{k}" for k in range(b)], outcome_rewards=torch.tensor(rewards, dtype=torch.float32),
        advantages=torch.tensor(adv, dtype=torch.float32) if adv is not None else None,
    )


# ---------------------------------------------------------------- criteria, by hand
def test_outcome_criterion_drops_groups_with_equal_rewards_interleaved():
    # groups 5: (1, 1) equal -> dropped; 7: (0, 1) kept; 9: (1, 0) kept; 4: (0.5, 0.5, 0.5) dropped
    batch = _batch([5, 7, 5, 9, 7, 4, 9, 4, 4], [1, 0, 1, 1, 1, .5, 0, .5, .5])
    assert signal_mask(batch, "outcome").tolist() == [False, True, False, True, True, False, True, False, False]
    assert ordered_group_ids(batch.group_ids[signal_mask(batch, "outcome")]) == [7, 9]


def test_advantage_criterion_keeps_equal_outcomes_with_process_signal():
    zero, step = [0.0, 0.0, 0.0], [0.0, 0.3, -0.3]
    # group 5: equal outcomes but one completion has nonzero token advantages -> kept by 'advantage' only;
    # group 7: all token advantages exactly 0 -> dropped by both; group 9: outcomes differ, advantages vary -> kept
    batch = _batch([5, 7, 9, 5, 7, 9], [1, 0, 1, 1, 0, 0], [zero, zero, [1., 1., 1.], step, zero, [-1., -1., -1.]])
    assert signal_mask(batch, "advantage").tolist() == [True, False, True, True, False, True]
    assert signal_mask(batch, "outcome").tolist() == [False, False, True, False, False, True]


def test_advantage_criterion_ignores_padding():
    batch = _batch([1, 1], [0, 0], [[0.0, 0.0, 0.0], [0.0, 0.0, 0.0]])
    batch.advantages[1, 2] = 5.0  # a padded position (masked out below) may not count as signal
    batch.completion_mask[1, 2] = False
    assert signal_mask(batch, "advantage").tolist() == [False, False]


def test_concat_rollouts_pads_prompts_left_and_completions_right():
    a = _batch([1, 1], [0, 1], [[1.0, 2.0, 3.0]] * 2, t=3, p=2)
    b = _batch([2], [1], [[4.0, 5.0, 6.0, 7.0]], t=4, p=3)
    out = concat_rollouts([a, b], pad_id=0)
    assert out.size == 3 and out.group_ids.tolist() == [1, 1, 2]
    assert out.prompt_ids[0].tolist() == [0, 0, 1] and out.prompt_mask[0].tolist() == [0, 1, 1]  # left-padded
    assert out.prompt_ids[2].tolist() == [0, 1, 2]
    assert out.completion_ids[0].tolist() == [100, 101, 102, 0]  # right-padded
    assert out.completion_mask[0].tolist() == [True, True, True, False]
    assert out.advantages.tolist() == [[1, 2, 3, 0], [1, 2, 3, 0], [4, 5, 6, 7]]
    assert out.answers == ["1", "1", "2"] and out.completions == ["c0", "c1", "c0"]
    b.advantages = None
    with pytest.raises(ValueError, match="advantages is set in some rounds"):
        concat_rollouts([a, b], pad_id=0)


def test_filler_keeps_signal_groups_in_draw_order_up_to_the_need():
    cfg = SamplingConfig(num_generations=2, dynamic_sampling={"enabled": True}).dynamic_sampling
    filler = _Filler(cfg, {"id": torch.tensor([5, 7, 9])}, StepContext(step=0), seed=0)
    filler.absorb(_batch([5, 5, 7, 7, 9, 9], [1, 1, 0, 1, 0, 0]))  # only 7 has signal
    assert (filler.kept_groups, filler.dropped, filler.need) == (1, 2, 2)
    assert filler.draw_count() == 3  # need 2 / kept fraction 1/3 = 6 → capped at the batch size 3
    filler.absorb(_batch([11, 11, 12, 12, 13, 13], [0, 1, 1, 0, 0, 1]))  # 3 with signal, 2 needed
    assert (filler.kept_groups, filler.surplus, filler.need) == (3, 1, 0)
    kept = concat_rollouts(filler.kept, pad_id=0)
    assert ordered_group_ids(kept.group_ids) == [7, 11, 12] and kept.size == 6
    assert filler.draw_count() == 0


# ---------------------------------------------------------------- config and data
@pytest.mark.parametrize("bad, match", [
    ({"criterion": "reward"}, "criterion must be 'outcome'"),
    ({"max_rounds": -1}, "max_rounds must be an integer >= 0"),
    ({"rounds": 2}, r"unknown keys \['rounds'\]"),
])
def test_config_errors_name_the_valid_options(bad, match):
    with pytest.raises(ValueError, match=match):
        SamplingConfig(dynamic_sampling={"enabled": True, **bad})


def test_dynamic_sampling_must_be_a_mapping():
    with pytest.raises(TypeError, match="must be a mapping"):
        SamplingConfig(dynamic_sampling=True)


def test_draw_names_the_datamodule_method_to_implement():
    sampling = SamplingConfig(num_generations=2, dynamic_sampling={"enabled": True})

    class NoExtras:
        pass

    class Repeats:
        def extra_prompts(self, count, seed, exclude_ids):
            return {"id": torch.tensor([5]), "problem": ["x"], "answer": ["y"]}

    for datamodule, error, match in ((None, TypeError, r"no method extra_prompts\(count, seed, exclude_ids\)"),
                                     (NoExtras(), TypeError, "NoExtras has no method extra_prompts"),
                                     (Repeats(), ValueError, "none of the excluded ids")):
        ctx = StepContext(step=0, rank=0, world_size=1, datamodule=datamodule)
        with pytest.raises(error, match=match):
            _Filler(sampling.dynamic_sampling, {"id": torch.tensor([5])}, ctx, seed=0).draw(1, round_index=1)


def test_outcome_criterion_needs_two_generations():
    with pytest.raises(ValueError, match="needs num_generations >= 2"):
        SamplingConfig(num_generations=1, dynamic_sampling=DynamicSamplingConfig(enabled=True))
    SamplingConfig(num_generations=1, dynamic_sampling=DynamicSamplingConfig(enabled=True, criterion="advantage"))


def test_extra_prompts_are_deterministic_and_exclude_drawn_ids():
    dm = ToyPrompts(n=10)
    dm.setup()
    first = dm.extra_prompts(4, seed=draw_seed(3, 2, 1, 0), exclude_ids={0, 1, 2})
    again = dm.extra_prompts(4, seed=draw_seed(3, 2, 1, 0), exclude_ids={0, 1, 2})
    assert first["id"].tolist() == again["id"].tolist() and len(set(first["id"].tolist())) == 4
    assert not {0, 1, 2} & set(first["id"].tolist())
    assert first["problem"] == [f"{i}+{i}=" for i in first["id"].tolist()]
    assert dm.extra_prompts(20, seed=1, exclude_ids=range(8))["id"].tolist() in ([8, 9], [9, 8])
    assert dm.extra_prompts(3, seed=1, exclude_ids=range(10))["id"].numel() == 0
    assert draw_seed(3, 2, 1, 0) != draw_seed(3, 2, 1, 1) != draw_seed(3, 2, 2, 0)


# ---------------------------------------------------------------- training runs
class ConstantForSomeVerifier(OutcomeVerifier):
    """Reward 0 for every completion of a prompt whose id is a multiple of 3 (a group without signal); else the
    row's position in the batch (all different, so the group has signal)."""

    def verify(self, completion: str, gold: str) -> Verdict:
        raise NotImplementedError

    def verify_batch(self, completions, golds, rows=None) -> list[Verdict]:
        return [Verdict(VerdictStatus.INCORRECT, 0.0 if int(r["id"]) % 3 == 0 else float(k))
                for k, r in enumerate(rows)]


class AllConstantVerifier(ConstantForSomeVerifier):
    def verify_batch(self, completions, golds, rows=None) -> list[Verdict]:
        return [Verdict(VerdictStatus.INCORRECT, 0.0) for _ in rows]


class RecordingModule(PRPOModule):
    """Records, per step, the prompt ids of every generation round and the rollout the update saw."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.rounds: dict[int, list[list[int]]] = {}
        self.updated: dict[int, RolloutBatch | None] = {}

    def configure_model(self) -> None:
        super().configure_model()
        make = self.collector.make_rollout

        def recording(batch, ctx, *args, **kwargs):
            if not kwargs.get("greedy"):
                self.rounds.setdefault(ctx.step, []).append(batch["id"].tolist())
            return make(batch, ctx, *args, **kwargs)

        self.collector.make_rollout = recording

    def update_policy(self, rollout):
        self.updated[self.global_step] = rollout
        return super().update_policy(rollout)


class MetricsRecorder(L.Callback):
    def __init__(self) -> None:
        self.rows: list[dict[str, float]] = []
        self.logged: set[str] = set()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        m = trainer.callback_metrics
        self.logged |= {k for k in m if k.startswith("train/")}
        self.rows.append({k.removeprefix("train/dynamic_sampling/"): float(v) for k, v in m.items()
                          if k.startswith("train/dynamic_sampling/")})


def _ds_module(tok: str, verifier: OutcomeVerifier, max_rounds: int = 3, **kw: Any) -> RecordingModule:
    sampling = SamplingConfig(num_generations=2, max_new_tokens=6, max_prompt_length=32,
                              dynamic_sampling={"enabled": True, "max_rounds": max_rounds, "criterion": "outcome"})
    return make_module(tok, RecordingModule, verifier=verifier, aligner=GroupNormAligner(), sampling=sampling, **kw)


@pytest.mark.slow
def test_training_drops_constant_groups_and_refills_the_batch(tmp_path):
    tok = tokenizer_dir(tmp_path)
    module, rec = _ds_module(tok, ConstantForSomeVerifier()), MetricsRecorder()
    with time_limit(300):
        make_trainer(tmp_path, 3, [rec]).fit(module, ToyPrompts(n=24, batch_size=4))
    assert module.global_step == 3 and len(rec.rows) == 3
    for step in range(3):
        rounds, m = module.rounds[step], rec.rows[step]
        drawn = [i for r in rounds for i in r]
        assert len(drawn) == len(set(drawn))  # no prompt drawn twice in a step
        assert m["rounds"] == len(rounds) - 1
        assert m["prompts_consumed"] == len(drawn)
        assert m["groups_dropped"] == sum(i % 3 == 0 for i in drawn)
        kept_ids = ordered_group_ids(module.updated[step].group_ids)
        assert m["groups_kept"] == len(kept_ids) == 4 and m["batch_filled"] == 1.0
        assert module.updated[step].size == 4 * 2 and all(i % 3 for i in kept_ids)
        with_signal = [i for i in drawn if i % 3]
        assert kept_ids == with_signal[:4] and m["groups_surplus"] == len(with_signal) - 4
    assert any(len(module.rounds[s]) > 1 for s in range(3))  # some step needed an extra round
    from test_docs_howto import glossary_terms

    assert "train/dynamic_sampling/rounds" in rec.logged
    assert not rec.logged - glossary_terms(), "logged metrics missing from docs/metrics.rst"


@pytest.mark.slow
def test_exhausted_rounds_train_on_what_was_kept(tmp_path, caplog):
    tok = tokenizer_dir(tmp_path)
    module, rec = _ds_module(tok, ConstantForSomeVerifier(), max_rounds=0), MetricsRecorder()
    dm = ToyPrompts(n=12, batch_size=4, rows=[{"id": i, "problem": f"{i}+{i}=", "answer": str(2 * i)}
                                              for i in (0, 3, 6, 1, 2, 4, 5, 7, 8, 9, 10, 11)])
    with time_limit(300), caplog.at_level("WARNING", logger="prpo_lightning.rollout.dynamic_sampling"):
        make_trainer(tmp_path, 2, [rec]).fit(module, dm)
    for step in range(2):
        drawn = module.rounds[step][0]
        assert len(module.rounds[step]) == 1 and rec.rows[step]["rounds"] == 0
        n_kept = sum(i % 3 != 0 for i in drawn)
        assert rec.rows[step]["groups_kept"] == n_kept and rec.rows[step]["groups_dropped"] == 4 - n_kept
        if n_kept < 4:
            assert rec.rows[step]["batch_filled"] == 0.0
        if n_kept:
            assert module.updated[step].size == 2 * n_kept
    assert any(rec.rows[s]["batch_filled"] == 0.0 for s in range(2)) and "ran out of rounds" in caplog.text


@pytest.mark.slow
def test_no_group_with_signal_updates_nothing_and_stops(tmp_path):
    tok = tokenizer_dir(tmp_path)
    module, rec = _ds_module(tok, AllConstantVerifier(), max_rounds=2), MetricsRecorder()
    dm = ToyPrompts(n=12, batch_size=2)
    with time_limit(300):
        make_trainer(tmp_path, 2, [rec]).fit(module, dm)
    initial = _ds_module(tok, AllConstantVerifier())
    initial.configure_model()  # the same seeded random initialisation
    for name, value in initial.policy.state_dict().items():
        assert torch.equal(value, module.policy.state_dict()[name]), name
    assert module.global_step == 2 and module.updated == {}  # the step advanced without an update
    for step in range(2):
        assert rec.rows[step]["rounds"] == 2 and rec.rows[step]["groups_kept"] == 0
        assert rec.rows[step]["prompts_consumed"] == 2 + 2 + 2 and rec.rows[step]["groups_dropped"] == 6


@pytest.mark.slow
def test_resume_is_exact_with_dynamic_sampling(tmp_path):
    """4 straight steps == 2 steps + checkpoint + 2 resumed steps: same weights, same rounds and draws."""
    from lightning.pytorch.callbacks import ModelCheckpoint

    tok = tokenizer_dir(tmp_path)

    def run(root, steps, ckpt=None):
        module, rec = _ds_module(tok, ConstantForSomeVerifier()), MetricsRecorder()
        saver = ModelCheckpoint(dirpath=str(root), every_n_train_steps=1, save_last=True, save_top_k=-1)
        with time_limit(300):
            make_trainer(root, steps, [rec, saver], enable_checkpointing=True).fit(
                module, ToyPrompts(n=12, batch_size=2), ckpt_path=ckpt)
        return module, rec

    straight, rec_a = run(tmp_path / "a", 4)
    run(tmp_path / "b", 2)
    resumed, rec_c = run(tmp_path / "c", 4, str(tmp_path / "b" / "last.ckpt"))
    a, c = straight.policy.state_dict(), resumed.policy.state_dict()
    for name in a:
        assert torch.equal(a[name], c[name]), name
    assert [straight.rounds[s] for s in (2, 3)] == [resumed.rounds[s] for s in (2, 3)]
    assert rec_a.rows[2:] == rec_c.rows
    assert sum(r["rounds"] for r in rec_a.rows) > 0  # the resumed steps went through the refill loop


@pytest.mark.slow
@pytest.mark.parametrize("method", ["grpo", "prpo"])
def test_cli_fit_two_steps_with_dynamic_sampling(tmp_path, monkeypatch, method):
    from helpers import tiny_qwen2_config

    from prpo_lightning.cli import cli_main

    monkeypatch.setattr("sys.argv", ["prpo-fit"])
    import json

    aligner = {"grpo": "components.aligners.GRPOAligner", "prpo": "components.aligners.PRPOAligner"}[method]
    criterion = {"grpo": "outcome", "prpo": "advantage"}[method]
    args = [
        "fit", "--seed_everything=0", "--trainer.accelerator=cpu", "--trainer.devices=1", "--trainer.max_steps=2",
        "--trainer.num_sanity_val_steps=0", "--trainer.limit_val_batches=0", "--trainer.enable_checkpointing=false",
        f"--trainer.default_root_dir={tmp_path}", "--model.policy=null",
        f"--model.policy_config={json.dumps(tiny_qwen2_config(vocab_size=128))}",
        f"--model.tokenizer={tokenizer_dir(tmp_path)}", "--model.verifier=test_resume.ParityVerifier",
        f"--model.aligner={aligner}", "--model.sampling.num_generations=4", "--model.sampling.max_new_tokens=16",
        "--model.sampling.dynamic_sampling.enabled=true", "--model.sampling.dynamic_sampling.max_rounds=2",
        f"--model.sampling.dynamic_sampling.criterion={criterion}",
        "--model.optim.lr=1e-4", "--model.optim.micro_batch_size=8", "--model.loss.kl_coef=0.01",
        "--model.prompt_template=Q: {problem}\nA:\n", "--data=prpo_lightning.data.ArithmeticDataModule",
        "--data.num_train=16", "--data.num_eval=4", "--data.batch_size=2",
    ]
    if method == "prpo":
        args += ["--model.segmenter=components.segmenters.EntropySpikeSegmenter", "--model.segmenter.min_gap=4",
                 "--model.prm=components.prms.EquationCheckPRM"]
    with time_limit(300):
        cli = cli_main(args)
    ds = cli.model.sampling.dynamic_sampling
    assert (ds.enabled, ds.max_rounds, ds.criterion) == (True, 2, criterion)
    assert cli.trainer.global_step == 2
    m = cli.trainer.callback_metrics
    assert 0 <= float(m["train/dynamic_sampling/rounds"]) <= 2
    assert float(m["train/dynamic_sampling/prompts_consumed"]) >= 2
    assert float(m["train/dynamic_sampling/groups_kept"]) + float(m["train/dynamic_sampling/groups_dropped"]) \
        + float(m["train/dynamic_sampling/groups_surplus"]) <= float(m["train/dynamic_sampling/prompts_consumed"])


# ---------------------------------------------------------------- DDP
class RankZeroConstantVerifier(ConstantForSomeVerifier):
    """On rank 0, groups of prompt ids divisible by 3 have no signal; on rank 1 every group has signal, so only rank 0
    needs extra rounds and rank 1 must join them with empty batches."""

    def verify_batch(self, completions, golds, rows=None) -> list[Verdict]:
        rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
        return [Verdict(VerdictStatus.INCORRECT, 0.0 if rank == 0 and int(r["id"]) % 3 == 0 else float(k))
                for k, r in enumerate(rows)]


def _ddp_worker(out: Path, tok: str) -> None:
    module, rec = _ds_module(tok, RankZeroConstantVerifier(), max_rounds=4), MetricsRecorder()
    trainer = make_trainer(out, 3, [rec], strategy="ddp", devices=2)
    trainer.fit(module, ToyPrompts(n=40, batch_size=2))
    kept = {s: (ordered_group_ids(r.group_ids) if r is not None else []) for s, r in module.updated.items()}
    torch.save({"rounds": module.rounds, "kept": kept, "metrics": rec.rows}, out / f"rank{trainer.global_rank}.pt")


@pytest.mark.slow
def test_ddp_ranks_run_the_same_rounds_and_keep_the_global_batch(tmp_path):
    tok = tokenizer_dir(tmp_path)
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "OMP_NUM_THREADS": "1"}
    env["PYTHONPATH"] = os.pathsep.join([str(Path(__file__).resolve().parents[1]), env.get("PYTHONPATH", "")])
    proc = subprocess.run([sys.executable, str(Path(__file__).resolve()), str(tmp_path), tok], env=env, check=False,
                          capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in (0, 1))
    for step in range(3):
        assert len(r0["rounds"][step]) == len(r1["rounds"][step])  # the same rounds on both ranks
        assert all(not extra for extra in r1["rounds"][step][1:])  # rank 1 joined with empty batches
        assert len(r0["kept"][step]) == len(r1["kept"][step]) == 2  # each rank filled its own share
        assert all(i % 3 for i in r0["kept"][step])
        extra0 = [i for r in r0["rounds"][step][1:] for i in r]  # rank 0's extra draws: its shard (even ids) only,
        assert all(i % 2 == 0 for i in extra0)  # so never a prompt rank 1 could draw,
        assert not set(extra0) & set(r1["rounds"][step][0])  # nor one rank 1 trains on this step
        for m in (r0["metrics"][step], r1["metrics"][step]):
            assert m["groups_kept"] == 4 and m["batch_filled"] == 1.0  # the global batch: 2 ranks x 2 prompts
            assert m["rounds"] == len(r0["rounds"][step]) - 1
            drawn0 = [i for r in r0["rounds"][step] for i in r]
            assert m["groups_dropped"] == sum(i % 3 == 0 for i in drawn0)
            assert m["prompts_consumed"] == len(drawn0) + 2
    assert any(len(r0["rounds"][s]) > 1 for s in range(3))


if __name__ == "__main__":  # one DDP worker (re-executed by Lightning for rank 1)
    torch.set_num_threads(1)
    _ddp_worker(Path(sys.argv[1]), sys.argv[2])
