"""Qwen2.5-Math-PRM (7B/72B) with a native classification head, so no remote code has to be trusted."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn
from transformers import Qwen2Config, Qwen2Model, Qwen2PreTrainedModel
from transformers.modeling_outputs import TokenClassifierOutput

from components.prm_common import TaggedStepPRM, Truncation

__all__ = ["DEFAULT_SYSTEM_PROMPT", "QwenMathPRM", "Qwen2ForProcessRewardModel", "qwen_prm_text"]

DEFAULT_SYSTEM_PROMPT = "Please reason step by step, and put your final answer within \\boxed{}."


class Qwen2ForProcessRewardModel(Qwen2PreTrainedModel):
    """Qwen2 decoder + the Qwen2.5-Math-PRM step head: ``Linear(h, h) → ReLU → Linear(h, 2)``.

    Parameter names match the released checkpoints (``model.*``, ``score.0.*``, ``score.2.*``), so
    ``Qwen2ForProcessRewardModel.from_pretrained(path)`` loads them without ``trust_remote_code``.

    Shapes: ``input_ids (b, N)`` → ``logits (b, N, 2)``; index 1 is "step correct".
    """

    config_class = Qwen2Config

    def __init__(self, config: Qwen2Config) -> None:
        super().__init__(config)
        self.num_labels = 2
        self.model = Qwen2Model(config)
        self.score = nn.Sequential(
            nn.Linear(config.hidden_size, config.hidden_size),
            nn.ReLU(),
            nn.Linear(config.hidden_size, self.num_labels),
        )
        self.post_init()

    def forward(
        self,
        input_ids: Tensor | None = None,
        attention_mask: Tensor | None = None,
        position_ids: Tensor | None = None,
        inputs_embeds: Tensor | None = None,
        **kwargs: Any,
    ) -> TokenClassifierOutput:
        """Return ``TokenClassifierOutput(logits=(b, N, 2))``."""
        hidden = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            inputs_embeds=inputs_embeds,
            use_cache=False,
        ).last_hidden_state  # (b, N, h)
        return TokenClassifierOutput(logits=self.score(hidden))  # (b, N, 2)


def qwen_prm_text(system: str, problem: str, steps: list[str], separator: str = "<extra_0>") -> str:
    """The Qwen ChatML text of the model card, without a generation prompt.

    ``<|im_start|>system\\n{system}<|im_end|>\\n<|im_start|>user\\n{problem}<|im_end|>\\n<|im_start|>assistant\\n``
    ``{step_1}<extra_0>{step_2}<extra_0>…{step_J}<extra_0><|im_end|>\\n``.
    """
    content = "".join(s + separator for s in steps)
    return (
        f"<|im_start|>system\n{system}<|im_end|>\n<|im_start|>user\n{problem}<|im_end|>\n"
        f"<|im_start|>assistant\n{content}<|im_end|>\n"
    )


class QwenMathPRM(TaggedStepPRM):
    """Qwen2.5-Math-PRM: step score = P(positive) at the ``<extra_0>`` that closes each step.

    Input (model card): the chat template with the system prompt, the question (``batch.problems[i]``) as
    the user turn and, as the assistant turn, the segments (decoded with the policy tokenizer) each followed
    by ``<extra_0>``. Score of step j: ``softmax(logits at the j-th <extra_0>)[1]``, conditioned on the question
    and steps 1..j (one causal forward pass per completion, batched). If the PRM tokenizer has a chat template
    it is used (``add_generation_prompt=False``), else :func:`qwen_prm_text`. Separator strings inside a step
    are removed. Too-long inputs follow :class:`~components.prm_common.TaggedStepPRM`'s truncation rule.

    Output: ``step_scores (B, S)`` in [0, 1], ``step_mask (B, S)``.

    Args:
        model_name_or_path: checkpoint (e.g. ``Qwen/Qwen2.5-Math-PRM-7B``) or local directory.
        tokenizer_name_or_path: PRM tokenizer (default: the checkpoint).
        system_prompt: the system turn.
        separator: the step token (must be a single special token of the PRM tokenizer).
        max_length: PRM context limit in tokens (the authors tokenise with 4096).
        micro_batch_size: PRM inputs per forward pass.
        dtype: parameter dtype (``"bfloat16"`` as the authors; ``"float32"`` on CPU).
        truncation: ``"carry_forward"`` or ``"error"``.
        skip_special_tokens: drop special tokens (EOS) when decoding segments.
    """

    def __init__(
        self,
        model_name_or_path: str = "Qwen/Qwen2.5-Math-PRM-7B",
        tokenizer_name_or_path: str | None = None,
        system_prompt: str = DEFAULT_SYSTEM_PROMPT,
        separator: str = "<extra_0>",
        max_length: int = 4096,
        micro_batch_size: int = 4,
        dtype: str = "bfloat16",
        truncation: Truncation = "carry_forward",
        skip_special_tokens: bool = True,
    ) -> None:
        super().__init__(
            model_name_or_path, tokenizer_name_or_path, max_length, micro_batch_size, dtype, truncation,
            skip_special_tokens,
        )
        self.system_prompt = system_prompt
        self.separator = separator
        self._tag_id: int | None = None

    @property
    def tag_id(self) -> int:
        """Id of ``<extra_0>``, looked up in the PRM tokenizer (must encode to exactly one token)."""
        if self._tag_id is None:
            ids = self.tokenizer.encode(self.separator, add_special_tokens=False)
            if len(ids) != 1:
                raise ValueError(f"separator {self.separator!r} is not a single token of the PRM tokenizer: {ids}")
            self._tag_id = int(ids[0])
        return self._tag_id

    def build_text(self, problem: str, steps: list[str]) -> str:
        """Chat-formatted PRM input with ``<extra_0>`` after every step."""
        steps = [s.replace(self.separator, "") for s in steps]
        if getattr(self.tokenizer, "chat_template", None):
            content = "".join(s + self.separator for s in steps)
            messages = [
                {"role": "system", "content": self.system_prompt},
                {"role": "user", "content": problem},
                {"role": "assistant", "content": content},
            ]
            return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=False)
        return qwen_prm_text(self.system_prompt, problem, steps, self.separator)

    def load_model(self, path: str, dtype: torch.dtype) -> torch.nn.Module:
        """Load :class:`Qwen2ForProcessRewardModel` natively (no remote code)."""
        return Qwen2ForProcessRewardModel.from_pretrained(path, dtype=dtype)

    def positive_probs(self, model: torch.nn.Module, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        """``(b, N)`` ``softmax(logits)[..., 1]``."""
        logits = model(input_ids=input_ids, attention_mask=attention_mask).logits  # (b, N, 2)
        return torch.softmax(logits.float(), dim=-1)[..., 1]  # (b, N)
