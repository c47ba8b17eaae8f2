"""Math-Shepherd PRM (``peiyi9979/math-shepherd-mistral-7b-prm``): a causal LM read at " ки" step tags."""

from __future__ import annotations

import torch
from torch import Tensor

from components.prm_common import TaggedStepPRM, Truncation

__all__ = ["MathShepherdPRM"]


class MathShepherdPRM(TaggedStepPRM):
    """Math-Shepherd: step score = P("+") of the 2-way softmax over the "+"/"-" logits at each step tag.

    Input (model card): the plain string ``"{question} {solution}"`` (no chat template), where the solution is
    the steps joined by ``step_joiner`` and each step is ``step_template.format(text=step, tag=step_tag)``
    (default ``"{text} ки"``). Tokenised with the tokenizer's special tokens (BOS). Score of step j:
    ``softmax(logits[t_j, [id(+), id(−)]])[0]`` at the j-th tag position ``t_j``. Tag strings inside a step are
    removed. Too-long inputs follow :class:`~components.prm_common.TaggedStepPRM`'s truncation rule.

    Output: ``step_scores (B, S)`` in [0, 1], ``step_mask (B, S)``.

    Args:
        model_name_or_path: causal-LM checkpoint or directory.
        tokenizer_name_or_path: its tokenizer (default: the checkpoint).
        step_tag: the tag text (``"ки"``, Cyrillic); its id is the last token of its encoding.
        good_token: the "correct" token text (``"+"``).
        bad_token: the "incorrect" token text (``"-"``).
        step_template: format of one step, with ``{text}`` and ``{tag}``.
        step_joiner: text between steps.
        max_length: context limit in tokens.
        micro_batch_size: inputs per forward pass.
        dtype: parameter dtype.
        truncation: ``"carry_forward"`` or ``"error"``.
        skip_special_tokens: drop special tokens when decoding segments.
    """

    add_special_tokens = True

    def __init__(
        self,
        model_name_or_path: str = "peiyi9979/math-shepherd-mistral-7b-prm",
        tokenizer_name_or_path: str | None = None,
        step_tag: str = "ки",
        good_token: str = "+",
        bad_token: str = "-",
        step_template: str = "{text} {tag}",
        step_joiner: str = "\n",
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
        self.step_tag = step_tag
        self.good_token = good_token
        self.bad_token = bad_token
        self.step_template = step_template
        self.step_joiner = step_joiner
        self._ids: tuple[int, int, int] | None = None

    def _token_ids(self) -> tuple[int, int, int]:
        """``(tag, good, bad)`` ids, checked at load time as the model card does."""
        if self._ids is None:
            enc = self.tokenizer.encode
            pair = enc(f"{self.good_token} {self.bad_token}", add_special_tokens=False)
            if len(pair) == 2:
                good, bad = pair
            else:
                good = enc(self.good_token, add_special_tokens=False)[-1]
                bad = enc(self.bad_token, add_special_tokens=False)[-1]
            tag = enc(self.step_tag, add_special_tokens=False)[-1]
            if len({tag, good, bad}) != 3:
                raise ValueError(f"step tag / good / bad tokens must be distinct, got ids {(tag, good, bad)}")
            self._ids = (int(tag), int(good), int(bad))
        return self._ids

    @property
    def tag_id(self) -> int:
        """Id of the step tag."""
        return self._token_ids()[0]

    def build_text(self, problem: str, steps: list[str]) -> str:
        """``"{question} {step_1} ки\\n{step_2} ки…"``."""
        body = self.step_joiner.join(
            self.step_template.format(text=s.replace(self.step_tag, "").strip(), tag=self.step_tag) for s in steps
        )
        return f"{problem} {body}"

    def load_model(self, path: str, dtype: torch.dtype) -> torch.nn.Module:
        """Load the causal LM with ``AutoModelForCausalLM``."""
        from transformers import AutoModelForCausalLM

        return AutoModelForCausalLM.from_pretrained(path, dtype=dtype)

    def positive_probs(self, model: torch.nn.Module, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        """``(b, N)`` ``softmax(logits[..., [good, bad]])[..., 0]``."""
        _, good, bad = self._token_ids()
        logits = model(input_ids=input_ids, attention_mask=attention_mask).logits  # (b, N, V)
        return torch.softmax(logits[..., [good, bad]].float(), dim=-1)[..., 0]  # (b, N)
