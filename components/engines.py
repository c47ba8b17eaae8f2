"""Rollout engines for ``model.engine``: the framework's engines on the live policy, re-exported for configs
(``components.engines.AutoEngine``, ``HFGenerateEngine``, ``StaticCacheEngine``), vLLM in the training process
(:class:`~components.engine_vllm.VLLMEngine`) and vLLM servers outside it
(:class:`~components.engine_vllm_server.VLLMServerEngine`)."""

from components.engine_vllm import VLLMEngine
from components.engine_vllm_server import VLLMServerEngine
from prpo_lightning.rollout.engines import AutoEngine, HFGenerateEngine, StaticCacheEngine

__all__ = ["AutoEngine", "HFGenerateEngine", "StaticCacheEngine", "VLLMEngine", "VLLMServerEngine"]
