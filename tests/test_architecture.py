"""The shape of the framework (issue 21): import graph, layout, the module's size, typed needs, the pass plan and the
symmetric contracts, each with the error a user meets when writing against the earlier API."""

from __future__ import annotations

import ast
import dataclasses
import importlib
import re
import warnings
from pathlib import Path

import pytest
import torch

from prpo_lightning import (
    AdvantageAligner, ComponentNeeds, OutcomeVerifier, ProcessRewardModel, RolloutEngine, SampleRequest, Segmenter,
)
from prpo_lightning.config import LossConfig, OptimConfig, SamplingConfig
from prpo_lightning.rollout.engine import EngineCapabilities
from prpo_lightning.training.outcome import RankReport, SkipBudget, SkippedBatchesError
from prpo_lightning.training.plan import RunNeeds, plan_passes

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("prpo_lightning", "components")


# ---------------------------------------------------------------- import graph
def _modules() -> dict[str, Path]:
    mods = {}
    for pkg in PACKAGES:
        for path in (ROOT / pkg).rglob("*.py"):
            parts = list(path.relative_to(ROOT).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            mods[".".join(parts)] = path
    return mods


def _import_edges(mods: dict[str, Path]) -> dict[str, set[str]]:
    """Runtime imports (function-level included, ``TYPE_CHECKING`` blocks excluded) between project modules."""

    def resolve(name: str) -> str:
        while name and name not in mods:
            name = name.rpartition(".")[0]
        return name

    edges: dict[str, set[str]] = {m: set() for m in mods}
    for mod, path in mods.items():
        is_pkg = path.name == "__init__.py"

        def visit(node: ast.AST, type_checking: bool) -> None:
            for child in ast.iter_child_nodes(node):
                tc = type_checking or (isinstance(child, ast.If) and "TYPE_CHECKING" in ast.unparse(child.test))
                names: list[str] = []
                if isinstance(child, ast.Import):
                    names = [a.name for a in child.names]
                elif isinstance(child, ast.ImportFrom):
                    base = child.module or ""
                    if child.level:
                        pkg = mod if is_pkg else mod.rpartition(".")[0]
                        for _ in range(child.level - 1):
                            pkg = pkg.rpartition(".")[0]
                        base = f"{pkg}.{base}" if base else pkg
                    names = [base] + [f"{base}.{a.name}" for a in child.names]
                for name in names:
                    target = resolve(name)
                    if not tc and target and target != mod and not (is_pkg and target.startswith(mod + ".")):
                        edges[mod].add(target)
                visit(child, tc)

        visit(ast.parse(path.read_text(encoding="utf-8")), False)
    return edges


def _cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out: list[list[str]] = []

    def strong(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in edges[v]:
            if w not in index:
                strong(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(edges):
        if v not in index:
            strong(v)
    return out


def test_the_cycle_finder_finds_a_planted_cycle():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert _cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_cycle_in_the_framework_or_the_components():
    edges = _import_edges(_modules())
    assert _cycles(edges) == []


def test_the_framework_imports_no_component_outside_the_cli():
    edges = _import_edges(_modules())
    offenders = {m: sorted(t for t in ts if t.startswith("components"))
                 for m, ts in edges.items() if m.startswith("prpo_lightning") and m != "prpo_lightning.cli"}
    assert {m: ts for m, ts in offenders.items() if ts} == {}


def test_layout_shows_the_pipeline():
    top = sorted(p.name for p in (ROOT / "prpo_lightning").glob("*.py"))
    assert len(top) <= 12, top
    for stage in ("rollout", "scoring", "training", "evaluation", "callbacks", "runtime"):
        assert (ROOT / "prpo_lightning" / stage / "__init__.py").exists(), stage


def test_the_module_is_one_class_of_at_most_300_lines_without_mixins():
    from prpo_lightning.module import PRPOModule

    lines = (ROOT / "prpo_lightning" / "module.py").read_text().count("\n")
    assert lines <= 300, lines
    assert PRPOModule.__bases__ == (importlib.import_module("lightning").LightningModule,)


def test_every_class_path_in_configs_and_docs_loads():
    found: set[str] = set()
    for folder, suffixes in (("configs", {".yaml"}), ("docs", {".rst", ".md", ".yaml", ".py"})):
        for path in (ROOT / folder).rglob("*"):
            if path.suffix in suffixes and "_build" not in path.parts:
                found |= set(re.findall(r"class_path:\s*([\w.]+)", path.read_text(encoding="utf-8")))
    ours = sorted(d for d in found if d.split(".")[0] in ("prpo_lightning", "components", "lightning"))
    assert len(ours) >= 15  # placeholders of the how-tos (``my_components.MyPRM``) are the user's
    for dotted in ours:
        module, _, name = dotted.rpartition(".")
        assert hasattr(importlib.import_module(module), name), dotted


def test_old_module_paths_still_import_with_a_deprecation_warning():
    from prpo_lightning.scoring.prm import ProcessScores

    with pytest.warns(DeprecationWarning, match="prpo_lightning.prm moved to prpo_lightning.scoring.prm"):
        old = importlib.import_module("prpo_lightning.prm")
    assert old.ProcessScores is ProcessScores
    with pytest.warns(DeprecationWarning, match="prpo_lightning.rollout.SamplingConfig moved to prpo_lightning.config"):
        from prpo_lightning.rollout import SamplingConfig as Old  # noqa: F401
    assert Old is SamplingConfig
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        importlib.import_module("prpo_lightning.scoring.prm")  # the new path: no warning


def test_sampling_engine_is_refused_naming_model_engine():
    with pytest.raises(ValueError, match="model.sampling.engine was removed.*model.engine"):
        SamplingConfig(engine="static")


# ---------------------------------------------------------------- typed needs
def test_needs_are_declared_once_and_checked_by_role():
    class NewPRM(ProcessRewardModel):
        needs = ComponentNeeds(reference_logprobs=True)

        def score(self, batch, tokenizer):
            raise NotImplementedError

    class LegacyPRM(ProcessRewardModel):
        requires_rollout_logprobs = True

        def score(self, batch, tokenizer):
            raise NotImplementedError

    assert NewPRM.needs == ComponentNeeds(reference_logprobs=True)
    assert LegacyPRM.needs == ComponentNeeds(rollout_logprobs=True)
    with pytest.raises(TypeError, match=r"declares \['requires_refrence'\].*does not know"):
        class Misspelt(ProcessRewardModel):
            requires_refrence = True
    with pytest.raises(TypeError, match=r"unexpected keyword argument 'entropys'"):
        ComponentNeeds(entropys=True)
    with pytest.raises(TypeError, match=r"segmenter WrongRole declares \['process_scores'\].*may declare \['entropies'\]"):
        class WrongRole(Segmenter):
            needs = ComponentNeeds(process_scores=True)
    with pytest.raises(TypeError, match="must be a bool"):
        class NotBool(AdvantageAligner):
            uses_process_scores = "yes"


def test_an_instance_flag_is_refused_with_the_fix():
    from prpo_lightning.scoring.needs import needs_of

    class Dynamic(AdvantageAligner):
        def __init__(self) -> None:
            self.requires_reference = True

        def advantage_terms(self, batch):
            raise NotImplementedError

    with pytest.raises(TypeError, match=r"self.needs = prpo_lightning.ComponentNeeds\(reference_logprobs=...\)"):
        needs_of(Dynamic(), "aligner")


# ---------------------------------------------------------------- the pass plan
CAPS_EXACT = EngineCapabilities(entropies=True, exact_trainer_distribution=True, needs_weight_sync=False)
CAPS_VLLM = EngineCapabilities(entropies=False, sampler_logprobs=True, exact_trainer_distribution=False)


@pytest.mark.parametrize(
    "needs, caps, loss, optim, expect",
    [  # (reference, old_logprobs, generation_entropies, sampler_check, share_prompt_prefix)
        (RunNeeds(), CAPS_EXACT, LossConfig(), OptimConfig(), (False, False, False, False, True)),  # GRPO on-policy
        (RunNeeds(), CAPS_EXACT, LossConfig(kl_coef=0.1), OptimConfig(ppo_epochs=2), (True, True, False, False, True)),
        (RunNeeds(process_scores=True, segmenter_entropies=True), CAPS_EXACT, LossConfig(), OptimConfig(),
         (False, False, True, False, True)),  # PRPO entropy spikes on-policy: recorded while sampling
        (RunNeeds(process_scores=True, segmenter_entropies=True), CAPS_VLLM, LossConfig(), OptimConfig(),
         (False, True, False, True, True)),  # vLLM: the trainer's pass gives log π_old, entropies and the check
        (RunNeeds(reference_logprobs=True, reads_logprobs=True), CAPS_EXACT, LossConfig(), OptimConfig(),
         (True, True, False, False, True)),  # SPRO: reference and the no-grad pass
        (RunNeeds(), CAPS_EXACT, LossConfig(), OptimConfig(share_prompt_prefix=False), (False, False, False, False,
                                                                                      False)),
    ],
)
def test_plan_passes_by_hand(needs, caps, loss, optim, expect):
    plan = plan_passes(needs, caps, loss, optim)
    assert (plan.reference, plan.old_logprobs, plan.generation_entropies, plan.sampler_check,
            plan.share_prompt_prefix) == expect
    assert plan.describe().startswith("[prpo] forward passes per step:")


def test_plan_under_gradient_checkpointing_or_lockstep_shares_no_prompts():
    assert not plan_passes(RunNeeds(), CAPS_EXACT, LossConfig(), OptimConfig(), gradient_checkpointing=True).share_prompt_prefix
    plan = plan_passes(RunNeeds(), CAPS_EXACT, LossConfig(), OptimConfig(), lockstep=True)
    assert plan.lockstep and not plan.share_prompt_prefix


# ---------------------------------------------------------------- contracts
def test_an_engine_with_the_old_sample_signature_is_refused_with_the_fix():
    with pytest.raises(TypeError, match=r"def sample\(self, request: prpo_lightning.SampleRequest\)"):
        class OldEngine(RolloutEngine):
            def sample(self, prompts, num_generations, sampling, seeds, greedy, record_entropies, batch_seed):
                raise NotImplementedError


def test_sample_request_size_and_immutability():
    request = SampleRequest([torch.tensor([1, 2]), torch.tensor([3])], 4, SamplingConfig(), [1, 2])
    assert request.size == 8
    with pytest.raises(dataclasses.FrozenInstanceError):
        request.num_generations = 2  # type: ignore[misc]


def test_a_verifier_with_the_old_batch_methods_is_refused_with_the_fix():
    with pytest.raises(TypeError, match="merged into the one batch method verify_batch"):
        class Rows(OutcomeVerifier):
            def verify(self, completion, gold):
                raise NotImplementedError

            def verify_rows(self, completions, golds, rows):
                raise NotImplementedError
    with pytest.raises(TypeError, match=r"define verify_batch\(self, completions, golds, rows=None\)"):
        class TwoArgs(OutcomeVerifier):
            def verify(self, completion, gold):
                raise NotImplementedError

            def verify_batch(self, completions, golds):
                raise NotImplementedError


# ---------------------------------------------------------------- the step's outcome
def test_skip_budget_decides_with_a_reason_and_keeps_its_count_in_a_state_dict():
    budget = SkipBudget(2)
    assert budget.decide(RankReport(False, None), 0, 8).reason == "update"
    first = budget.decide(RankReport(True, None), 1, 8)
    assert (first.update, first.reason, budget.consecutive) == (False, "no_prompts", 1)
    assert budget.decide(RankReport(False, "PRM down"), 2, 8).reason == "prm_error"
    restored = SkipBudget(2)
    restored.load_state_dict(budget.state_dict())
    assert restored.consecutive == 2
    with pytest.raises(SkippedBatchesError, match="3 batches in a row.*max_prompt_length=8"):
        restored.decide(RankReport(True, None), 3, 8)
    no_signal = SkipBudget(2).decide(RankReport(False, None, no_signal=True), 0, 8)
    assert (no_signal.update, no_signal.reason) == (False, "no_signal")


# ---------------------------------------------------------------- the two owned objects, without a Trainer
def test_the_collector_and_the_updater_run_without_a_trainer(tmp_path):
    from helpers import build_char_tokenizer, tiny_qwen2_config
    from test_resume import GroupNormAligner, ParityVerifier

    from prpo_lightning.batch import StepContext
    from prpo_lightning.config import MismatchCheck, RewardShapingConfig, RolloutCorrectionConfig
    from prpo_lightning.rollout.collector import PromptFormat, RolloutCollector
    from prpo_lightning.rollout.engines import AutoEngine
    from prpo_lightning.runtime.models import load_causal_lm, load_tokenizer
    from prpo_lightning.scoring.pipeline import Scorer
    from prpo_lightning.training.updater import PolicyUpdater

    tok = load_tokenizer(build_char_tokenizer(tmp_path / "tok"))
    sampling = SamplingConfig(num_generations=4, max_new_tokens=6, max_prompt_length=32)
    policy = load_causal_lm(None, tiny_qwen2_config(vocab_size=128, hidden=32, layers=2), seed=0, sampling=sampling)
    optim = OptimConfig(lr=1e-2, micro_batch_size=4)
    plan = plan_passes(RunNeeds(group_relative=True), AutoEngine.capabilities, LossConfig(), optim)
    scorer = Scorer(ParityVerifier(), GroupNormAligner(), None, None, tok, RewardShapingConfig(), 6)
    collector = RolloutCollector(AutoEngine(), policy, None, tok, scorer, plan, sampling,
                                 PromptFormat("{problem}", use_chat_template=False), 0, 4, MismatchCheck(),
                                 RolloutCorrectionConfig())
    batch = {"id": torch.tensor([0, 1]), "problem": ["1+1=", "2+2="], "answer": ["2", "4"]}
    collected = collector.collect(batch, StepContext(step=0))
    assert collected.rollout.size == 8 and collected.rollout.advantages.shape == collected.rollout.completion_mask.shape
    assert collected.metrics["data/skipped_long_prompts"] == 0.0 and "reward/mean" in collected.metrics

    optimizer = torch.optim.SGD(policy.parameters(), lr=0.1)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    steps: list[int] = []
    updater = PolicyUpdater(policy, LossConfig(), optim, plan, 1.0, 6, 0, tok.pad_token_id,
                            backward=lambda loss: loss.backward(),
                            clip_gradients=lambda opt, gradient_clip_val, gradient_clip_algorithm:
                            torch.nn.utils.clip_grad_norm_(policy.parameters(), gradient_clip_val),
                            on_optimizer_step=lambda: steps.append(1))
    before = [p.detach().clone() for p in policy.parameters()]
    stats = updater.update(collected.rollout, optimizer, scheduler, step=0, device=torch.device("cpu"))
    assert steps == [1] and stats["lr"] == pytest.approx(0.1) and "pg_loss" in stats
    assert any(not torch.equal(a, b) for a, b in zip(before, policy.parameters()))
    collector.on_optimizer_step()
    collector.sync_engine()
    assert collector.engine.weight_version == collector.weights_version == 1
