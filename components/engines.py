"""Rollout engines for ``model.engine``: the framework's engines on the live policy, re-exported for configs
(``components.engines.AutoEngine``, ``HFGenerateEngine``, ``StaticCacheEngine``), and vLLM
(:class:`~components.engine_vllm.VLLMEngine`)."""

from components.engine_vllm import VLLMEngine
from prpo_lightning.rollout.engines import AutoEngine, HFGenerateEngine, StaticCacheEngine

__all__ = ["AutoEngine", "HFGenerateEngine", "StaticCacheEngine", "VLLMEngine"]
