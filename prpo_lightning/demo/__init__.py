"""The offline embedded demo: a synthetic arithmetic task and builtin warm-started policies.

Importing this package registers the builtin model ``prpo-demo/arith-qwen2-tiny``, whose warm-started weights ship
with the package (see :mod:`.policy`; ``prpo-demo-warmstart``, :mod:`.warmstart`, rebuilds and compares them).
"""

from prpo_lightning.demo import policy as policy  # noqa: F401  (registers the builtin model)
from prpo_lightning.demo.arithmetic import make_split as make_split, write_jsonl as write_jsonl  # noqa: F401
from prpo_lightning.demo.policy import DEMO_PROMPT_TEMPLATE as DEMO_PROMPT_TEMPLATE  # noqa: F401
