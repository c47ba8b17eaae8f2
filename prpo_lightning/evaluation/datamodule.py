"""``MathBenchmarkDataModule``: evaluation benchmarks as the ``--data`` of ``prpo-fit validate`` / ``prpo-fit test``.

One command evaluates any Hugging Face checkpoint on MATH500::

    prpo-fit test --config configs/eval_math500.yaml --model.policy Qwen/Qwen2.5-Math-1.5B
"""

from __future__ import annotations

from typing import Any

from torch.utils.data import DataLoader

from prpo_lightning.data import PromptDataModule, PromptDataset, collate_prompts
from prpo_lightning.evaluation.benchmarks import load_benchmark, resolve_benchmark
from prpo_lightning.evaluation.runner import EvalConfig


class MathBenchmarkDataModule(PromptDataModule):
    """Problems of one or more math benchmarks for validation and test (no training split).

    Rows keep ``benchmark``, ``index``, ``problem_id``, ``subject``, ``level`` and ``prompt_template`` through
    collation; ``id`` is unique across the benchmarks of the module. ``PRPOModule.validation_step``/``test_step``
    read :attr:`eval_config` to decide what to evaluate and where to write the outputs.

    Args:
        benchmarks: registered names (``math500``, ``amc23``, ``aime24``) or JSONL paths.
        max_problems: evaluate the first N problems of each benchmark only (None: all).
        prompt_template: prompt for every benchmark (None: MATH500 uses the model's ``prompt_template``, which
            defaults to the paper's; AMC/AIME use the paper's competition prompt).
        eval_batch_size: prompts per generation batch (each gets ``n_samples`` samples when sampling).
        eval: greedy pass@1, n samples for pass@k/mean@n, sampling settings and the output directory.

    Raises:
        ValueError: on an unknown benchmark name or duplicate benchmarks.
    """

    def __init__(
        self,
        benchmarks: list[str] | None = None,
        max_problems: int | None = None,
        prompt_template: str | None = None,
        eval_batch_size: int = 32,
        eval: EvalConfig | None = None,
    ) -> None:
        super().__init__(batch_size=1, eval_batch_size=eval_batch_size, max_eval_samples=None)
        names = list(benchmarks or ["math500"])
        self.specs = [resolve_benchmark(b) for b in names]
        self.benchmark_names = [s.name for s in self.specs]
        if len(set(self.benchmark_names)) != len(self.benchmark_names):
            raise ValueError(f"duplicate benchmarks in {names}")
        self.max_problems = max_problems
        self.prompt_template = prompt_template
        self.eval_config = eval or EvalConfig()

    def load_rows(self) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
        rows: list[dict[str, Any]] = []
        for spec in self.specs:
            part = load_benchmark(spec, self.max_problems, self.prompt_template)
            for r in part:
                r["id"] = len(rows)  # unique across benchmarks; ``index`` stays the row in its own file
                rows.append(r)
        return [], rows

    def eval_dataloader(self) -> DataLoader:
        return DataLoader(PromptDataset(self.eval_rows), batch_size=self.eval_batch_size, collate_fn=collate_prompts)
