"""``PromptFormat``: how a problem becomes the policy's prompt (a template, optionally wrapped by the chat template)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class PromptFormat:
    """How a problem becomes a prompt: ``template.format(problem=...)``, wrapped by the chat template when enabled.

    Attributes:
        template: format string with ``{problem}`` (a row's own ``prompt_template`` replaces it).
        system_prompt: system message when the chat template is used.
        use_chat_template: apply the tokenizer's chat template (None: when the tokenizer has one).
    """

    template: str
    system_prompt: str | None = None
    use_chat_template: bool | None = None

    def __call__(self, problem: str, tokenizer: Any, template: str | None = None) -> str:
        text = (template or self.template).format(problem=problem)
        use_chat = self.use_chat_template
        if use_chat is None:
            use_chat = getattr(tokenizer, "chat_template", None) is not None
        if not use_chat:
            return text
        messages = [{"role": "system", "content": self.system_prompt}] if self.system_prompt else []
        messages.append({"role": "user", "content": text})
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


__all__ = ["PromptFormat"]
