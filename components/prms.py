"""Concrete process reward models, each selectable from YAML by ``class_path``.

Re-exports the implementations:

* :class:`~components.prm_qwen.QwenMathPRM`: Qwen2.5-Math-PRM checkpoints, native head (no remote code);
* :class:`~components.prm_served.ServedPRM`: the same PRM behind vLLM servers (launched or running), scored over HTTP;
* :class:`~components.prm_shepherd.MathShepherdPRM`: Math-Shepherd causal LM with " ки" step tags;
* :class:`~components.prm_implicit.ImplicitPRM`: β·(log π_old − log π_ref), no extra model;
* :class:`~components.equation_check.EquationCheckPRM`: offline rule-based arithmetic checker (the demo's PRM);
* :class:`~components.prm_learned.LearnedArithPRM`: a small learned PRM for the demo task, shipped with the package
  (``components/prm_models/arith-prm-tiny``; rebuilt by ``python -m components.prm_learned_build``);
* :class:`~components.prm_biased.BiasedPRM`: wraps any PRM and biases its scores (noise, short steps, early
  stopping, late-step penalty) in seeded, controlled ways (Hypothesis-1 experiments).

Every PRM returns ``ProcessScores(step_scores (B, S), step_mask (B, S), token_scores (B, T) | None)`` with
step scores conventionally P(step correct) in [0, 1]. Model PRMs run without grad, in eval mode, in
micro-batches, on the device given to ``setup`` (the policy's). Example::

    prm:
      class_path: components.prms.QwenMathPRM
      init_args: {model_name_or_path: Qwen/Qwen2.5-Math-PRM-7B, max_length: 4096, micro_batch_size: 4}
"""

from components.equation_check import EquationCheckPRM
from components.prm_biased import BiasedPRM
from components.prm_common import TaggedStepPRM, segment_texts, truncate_keep_first_tag
from components.prm_implicit import ImplicitPRM
from components.prm_learned import LearnedArithPRM
from components.prm_qwen import QwenMathPRM, Qwen2ForProcessRewardModel, qwen_prm_text
from components.prm_served import ServedPRM
from components.prm_shepherd import MathShepherdPRM

__all__ = [
    "BiasedPRM",
    "EquationCheckPRM",
    "ImplicitPRM",
    "LearnedArithPRM",
    "MathShepherdPRM",
    "Qwen2ForProcessRewardModel",
    "QwenMathPRM",
    "ServedPRM",
    "TaggedStepPRM",
    "qwen_prm_text",
    "segment_texts",
    "truncate_keep_first_tag",
]
