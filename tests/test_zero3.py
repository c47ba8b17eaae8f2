"""Models under DeepSpeed ZeRO-3 (prpo_lightning.runtime.zero3), on the CPU with one gloo rank.

Found by the GPU check (benchmarks/gpu_check.py, train_zero3): under Lightning's ``zero.Init`` a policy built from a
config failed in transformers' weight initialisation (``IndexError ... size 0``), and a KL reference made by
``deepcopy`` of the partitioned policy would hold empty placeholders.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

pytest.importorskip("deepspeed")
ROOT = Path(__file__).resolve().parents[1]

SCRIPT = textwrap.dedent("""
    import os, torch, torch.distributed as dist
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=os.environ["PORT"], RANK="0", WORLD_SIZE="1",
                      LOCAL_RANK="0")
    dist.init_process_group("gloo", rank=0, world_size=1)
    import deepspeed
    import prpo_lightning.module  # as in a real run, torch._dynamo is imported before zero.Init patches tensors
    from prpo_lightning.runtime.models import load_causal_lm
    from prpo_lightning.runtime.zero3 import transformers_zero3, unpartitioned_copy
    cfg = dict(model_type="qwen2", hidden_size=64, intermediate_size=128, num_hidden_layers=2,
               num_attention_heads=4, num_key_value_heads=2, vocab_size=256, max_position_embeddings=512,
               pad_token_id=0)
    ds = {"train_micro_batch_size_per_gpu": 1, "zero_optimization": {"stage": 3}}
    with deepspeed.zero.Init(config_dict_or_path=ds):
        try:
            load_causal_lm(None, cfg, seed=0)
            print("PLAIN_BUILD ok")
        except IndexError as err:
            print("PLAIN_BUILD IndexError", err)
    with deepspeed.zero.Init(config_dict_or_path=ds), transformers_zero3(ds):
        policy = load_causal_lm(None, cfg, seed=0)
    first = next(policy.parameters())
    print("PARTITIONED", first.numel() == 0, tuple(first.ds_shape))
    ref = unpartitioned_copy(policy, torch.device("cpu"))
    with deepspeed.zero.GatheredParameters(list(policy.parameters())):
        full = {k: v.detach().clone() for k, v in policy.named_parameters()}
    own = dict(ref.named_parameters())
    print("COPY_EQUAL", all(torch.equal(full[k], own[k]) for k in full))
    print("FROZEN", not any(p.requires_grad for p in ref.parameters()), not ref.training)
    print("PADDING_ROW_ZERO", float(ref.model.embed_tokens.weight[0].abs().max()) == 0.0)
    print("FINITE", bool(torch.isfinite(ref(torch.tensor([[1, 2, 3]])).logits).all()))
    from transformers.integrations import is_deepspeed_zero3_enabled
    print("UNREGISTERED", not is_deepspeed_zero3_enabled())
    from components.engine_vllm import policy_weights  # the VLLMEngine's weight stream, layer by layer
    streamed = dict(policy_weights(policy))
    full_names = dict(policy.named_parameters(remove_duplicate=False))
    print("STREAM_NAMES", sorted(streamed) == sorted(full_names))
    print("STREAM_FULL", all(torch.equal(streamed[k], full[k]) for k in full)
          and all(streamed[k].shape == full_names[k].ds_shape for k in streamed))
""")


@pytest.mark.slow
def test_policy_builds_under_zero_init_and_reference_and_vllm_stream_are_full(tmp_path):
    script = tmp_path / "zero3_build.py"
    script.write_text(SCRIPT)
    env = dict(os.environ, PYTHONPATH=str(ROOT), PORT="29541", OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, str(script)], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=600)
    lines = dict(line.split(" ", 1) for line in proc.stdout.splitlines() if " " in line)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert lines["PLAIN_BUILD"].startswith("IndexError")  # the failure the fix is for (transformers' own init)
    assert lines["PARTITIONED"] == "True (256, 64)"
    assert lines["COPY_EQUAL"] == "True"
    assert lines["FROZEN"] == "True True"
    assert lines["PADDING_ROW_ZERO"] == "True"
    assert lines["FINITE"] == "True"
    assert lines["UNREGISTERED"] == "True"
    assert lines["STREAM_NAMES"] == "True"  # every name, tied lm_head included, as vLLM's reload expects
    assert lines["STREAM_FULL"] == "True"  # gathered full tensors, not the empty shards
