"""How-to: write your own RolloutEngine (included in the docs, executed by tests/test_docs_howto.py)."""

from __future__ import annotations

import copy
from typing import Any, Protocol

import torch
from torch import Tensor

from prpo_lightning import EngineCapabilities, RolloutEngine, RolloutResult, SampleRequest
from prpo_lightning.rollout.engine import pack_completions
from prpo_lightning.training.logprobs import completion_logprobs
from prpo_lightning.config import SamplingConfig
from prpo_lightning.rollout.sampling import generate_groups


# [engine-class]
class CompletionServer(Protocol):
    """What the engine needs from a generation server (an HTTP client in practice)."""

    def load_weights(self, named_tensors: dict[str, Tensor]) -> None:
        """Replace the served model's weights."""

    def complete(self, prompt_ids: list[int], n: int, seed: int, params: dict[str, Any]) -> list[tuple[list[int], list[float]]]:
        """``n`` samples of one prompt: each sample's token ids and the log-prob of each token under the
        distribution it was drawn from."""


class RemoteEngine(RolloutEngine):
    """Samples on a generation server; pushes the policy's weights to it after every update.

    Args:
        server: the server client.
    """

    # the server's kernels are not the trainer's: the module recomputes log π_old, checks the server's log-probs
    # against it (train/rollout/*) and importance-weights the loss
    capabilities = EngineCapabilities(entropies=False, sampler_logprobs=True, exact_trainer_distribution=False)

    def __init__(self, server: CompletionServer) -> None:
        super().__init__()
        self.server = server

    def setup(self, policy: torch.nn.Module, tokenizer: Any, device: torch.device | None = None,
              lockstep: bool = False) -> None:
        super().setup(policy, tokenizer, device, lockstep)
        self.server.load_weights(self._weights(policy))

    def sync_weights(self, policy: torch.nn.Module, version: int | None = None) -> None:
        self.server.load_weights(self._weights(policy))
        super().sync_weights(policy, version)  # bumps weight_version: generate() checks it against the module's

    @staticmethod
    def _weights(policy: torch.nn.Module) -> dict[str, Tensor]:
        return {name: p.detach().cpu().clone() for name, p in policy.state_dict().items()}

    def sample(self, request: SampleRequest) -> RolloutResult:
        if not request.prompts:
            return RolloutResult.empty(self.device)
        sampling = request.sampling
        params = {"temperature": sampling.temperature, "top_p": sampling.top_p, "top_k": sampling.top_k,
                  "max_tokens": sampling.max_new_tokens, "greedy": request.greedy}
        rows, row_logprobs = [], []
        for prompt, seed in zip(request.prompts, request.seeds):  # one request per group, seeded: reproducible
            for tokens, logprobs in self.server.complete(prompt.tolist(), request.num_generations, seed, params):
                rows.append(tokens)
                row_logprobs.append(logprobs)
        eos = self.tokenizer.eos_token_id
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else eos
        ids, mask, truncated = pack_completions(rows, eos, pad, sampling.max_new_tokens, self.device)  # (B, T)
        sampler_logprobs = torch.zeros(ids.shape)  # (B, T), 0 on padding
        for i, logprobs in enumerate(row_logprobs):
            n = int(mask[i].sum())
            sampler_logprobs[i, :n] = torch.tensor(logprobs[:n])
        return RolloutResult(ids, mask, truncated, sampler_logprobs=sampler_logprobs.to(self.device))
# [engine-class-end]


# [server]
class InProcessServer:
    """A stand-in for a remote server: a copy of the policy that samples with HF ``generate`` (for the tests)."""

    def __init__(self, policy: torch.nn.Module, tokenizer: Any) -> None:
        self.model = copy.deepcopy(policy).eval()
        self.tokenizer = tokenizer
        self.loads = 0

    def load_weights(self, named_tensors: dict[str, Tensor]) -> None:
        self.model.load_state_dict(named_tensors)
        self.loads += 1

    @torch.no_grad()
    def complete(self, prompt_ids: list[int], n: int, seed: int, params: dict[str, Any]) -> list[tuple[list[int], list[float]]]:
        sampling = SamplingConfig(num_generations=n, temperature=params["temperature"], top_p=params["top_p"],
                                  top_k=params["top_k"], max_new_tokens=params["max_tokens"])
        prompt = torch.tensor(prompt_ids)
        ids, mask = generate_groups(self.model, self.tokenizer, [prompt], n, sampling, [seed], params["greedy"],
                                    sampler="hf")[:2]
        prompts = prompt[None, :].repeat(n, 1)  # (n, P)
        logp, _ = completion_logprobs(self.model, prompts, torch.ones_like(prompts), ids, mask, sampling.temperature)
        lengths = mask.sum(dim=1).tolist()
        return [(ids[i, :k].tolist(), logp[i, :k].tolist()) for i, k in enumerate(lengths)]
# [server-end]
