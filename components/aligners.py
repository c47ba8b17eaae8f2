"""Concrete advantage aligners, each selectable from YAML by ``class_path``.

Re-exports the implementations, which live in three modules to keep each one short:

* :mod:`components.aligners_outcome`: ``GRPOAligner``, ``DrGRPOAligner``, ``RLOOAligner``,
  ``ReinforcePPBaselineAligner`` (outcome only);
* :mod:`components.aligners_process`: ``PRPOAligner``, ``ProcessOnlyAligner``, ``PRMAvgAligner`` (PRM step
  scores);
* :mod:`components.aligners_dense`: ``SPROAligner``, ``PUREAligner``, ``PRIMEAligner`` (dense process credit).

Every aligner maps a scored :class:`~prpo_lightning.batch.RolloutBatch` to ``(B, T)`` float32 token
advantages, zero on padding, with group statistics taken by ``batch.group_ids``. Example::

    aligner:
      class_path: components.aligners.PRPOAligner
      init_args: {prior: uniform, outcome_norm: center, last_token_quirk: false}

A small registry also builds them by name: ``build_aligner("prpo", prior="triangular")``.
"""

from components.aligners_base import aligner_names, build_aligner, register_aligner
from components.aligners_dense import PRIMEAligner, PUREAligner, SPROAligner
from components.aligners_outcome import DrGRPOAligner, GRPOAligner, ReinforcePPBaselineAligner, RLOOAligner
from components.aligners_process import (
    SIGMA0_CODE,
    SIGMA0_UNIFORM,
    PRMAvgAligner,
    PRPOAligner,
    ProcessOnlyAligner,
)

__all__ = [
    "SIGMA0_CODE",
    "SIGMA0_UNIFORM",
    "DrGRPOAligner",
    "GRPOAligner",
    "PRIMEAligner",
    "PRMAvgAligner",
    "PRPOAligner",
    "PUREAligner",
    "ProcessOnlyAligner",
    "RLOOAligner",
    "ReinforcePPBaselineAligner",
    "SPROAligner",
    "aligner_names",
    "build_aligner",
    "register_aligner",
]
