"""``LearnedArithPRM``: a small learned PRM for the demo's arithmetic task, shipped with the package.

A :class:`~components.prm_qwen.Qwen2ForProcessRewardModel` (the Qwen2.5-Math-PRM head ``Linear → ReLU → Linear(2)``)
on the demo policy's architecture, initialised from the warm-started demo policy and trained for a few CPU minutes
on step labels of the arithmetic task: the scores that :class:`~components.equation_check.EquationCheckPRM` gives
to the steps of completions sampled from the demo policy. Unlike the exact rule, it is wrong on some steps, as real
PRMs are. Its weights (about 3 MB) live in ``components/prm_models/arith-prm-tiny`` with ``prm_train.json`` (the
training settings and the step accuracy on held-out steps); ``python -m components.prm_learned_build`` rebuilds
them. It never needs the hub.

Input: ``"Q: {problem}\\nA:\\n" + step_1 + "<step>" + step_2 + "<step>" …`` in the demo's character tokenizer with
the special token ``<step>`` added; the score of step j is ``softmax(logits at the j-th <step>)[1]``. Example::

    prm:
      class_path: components.prms.LearnedArithPRM
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor

from components.prm_common import TaggedStepPRM, Truncation
from components.prm_qwen import Qwen2ForProcessRewardModel

__all__ = ["DEFAULT_DIR", "STEP_TAG", "LearnedArithPRM", "prm_text"]

DEFAULT_DIR = Path(__file__).resolve().parent / "prm_models" / "arith-prm-tiny"
STEP_TAG = "<step>"
PROMPT = "Q: {problem}\nA:\n"  # the demo's prompt (prpo_lightning.demo.policy.DEMO_PROMPT_TEMPLATE)
REBUILD = "python -m components.prm_learned_build"


def prm_text(problem: str, steps: list[str]) -> str:
    """The PRM input: the demo prompt, then every step followed by ``<step>`` (tags inside a step removed)."""
    return PROMPT.format(problem=problem) + "".join(s.replace(STEP_TAG, "") + STEP_TAG for s in steps)


class LearnedArithPRM(TaggedStepPRM):
    """The learned demo PRM: P(step correct) read at the ``<step>`` tag closing each step.

    Output: ``step_scores (B, S)`` in [0, 1], ``step_mask (B, S)``; no token scores. Truncation and
    micro-batching follow :class:`~components.prm_common.TaggedStepPRM`.

    Args:
        model_name_or_path: the model directory (default: the shipped ``components/prm_models/arith-prm-tiny``).
        max_length: PRM context limit in tokens (the demo architecture has 256 positions).
        micro_batch_size: PRM inputs per forward pass.
        dtype: parameter dtype.
        truncation: ``"carry_forward"`` or ``"error"``.
        skip_special_tokens: drop special tokens (EOS) when decoding segments.
    """

    def __init__(
        self,
        model_name_or_path: str | None = None,
        max_length: int = 256,
        micro_batch_size: int = 64,
        dtype: str = "float32",
        truncation: Truncation = "carry_forward",
        skip_special_tokens: bool = True,
    ) -> None:
        path = str(model_name_or_path or DEFAULT_DIR)
        super().__init__(path, path, max_length, micro_batch_size, dtype, truncation, skip_special_tokens)
        self._tag_id: int | None = None

    def setup(self, device: torch.device | str = "cpu") -> None:
        """Load the model directory (never the hub).

        Raises:
            FileNotFoundError: if the directory holds no weights; rebuild them with
                ``python -m components.prm_learned_build``.
        """
        if not (Path(self.model_name_or_path) / "model.safetensors").exists():
            raise FileNotFoundError(f"LearnedArithPRM: no model.safetensors in {self.model_name_or_path}; rebuild the "
                                    f"shipped PRM with `{REBUILD}` or pass model_name_or_path")
        super().setup(device)

    @property
    def tag_id(self) -> int:
        """Id of ``<step>`` in the PRM tokenizer (one token)."""
        if self._tag_id is None:
            ids = self.tokenizer.encode(STEP_TAG, add_special_tokens=False)
            if len(ids) != 1:
                raise ValueError(f"{STEP_TAG!r} is not a single token of the PRM tokenizer: {ids}")
            self._tag_id = int(ids[0])
        return self._tag_id

    def build_text(self, problem: str, steps: list[str]) -> str:
        """:func:`prm_text`."""
        return prm_text(problem, steps)

    def load_model(self, path: str, dtype: torch.dtype) -> torch.nn.Module:
        """Load :class:`Qwen2ForProcessRewardModel` from the local directory."""
        return Qwen2ForProcessRewardModel.from_pretrained(path, dtype=dtype)

    def positive_probs(self, model: torch.nn.Module, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        """``(b, N)`` ``softmax(logits)[..., 1]``."""
        logits = model(input_ids=input_ids, attention_mask=attention_mask).logits  # (b, N, 2)
        return torch.softmax(logits.float(), dim=-1)[..., 1]  # (b, N)
