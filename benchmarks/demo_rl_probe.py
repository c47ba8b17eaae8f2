"""De-risking probe for the offline demo: does a minimal on-policy GRPO loop raise held-out accuracy by >= 10 points?

Standalone (not part of the package): warm-starts (or loads) the builtin demo policy, measures held-out greedy
accuracy, then runs a bare GRPO loop -- group-normalised +-1 outcome rewards, token-mean REINFORCE loss over the
completion tokens (one on-policy update per batch, so the PPO ratio is 1), AdamW -- and re-measures.

Example (the settings recommended for configs/demo.yaml)::

    python benchmarks/demo_rl_probe.py --seed 0 --steps 60

Prints one JSON line per evaluation and a final JSON summary (accuracy before/after, wall and CPU seconds).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from prpo_lightning.demo.arithmetic import generate_problems, is_correct, iter_problems  # noqa: E402
from prpo_lightning.demo.policy import accuracy, format_prompt, warm_start  # noqa: E402


def clock() -> dict[str, float]:
    return {"wall": time.perf_counter(), "cpu": time.process_time()}


def since(t: dict[str, float]) -> dict[str, float]:
    return {"wall_s": round(time.perf_counter() - t["wall"], 1), "cpu_s": round(time.process_time() - t["cpu"], 1)}


def rl_step(model, tok, opt, problems, args) -> dict[str, float]:
    """One GRPO step on ``problems`` (P prompts x G samples)."""
    model.eval()
    tok.padding_side = "left"
    enc = tok([format_prompt(p["problem"]) for p in problems], return_tensors="pt", padding=True,
              add_special_tokens=False)
    tg = clock()
    with torch.no_grad():
        out = model.generate(
            **enc, do_sample=True, temperature=args.temperature, top_k=0, top_p=1.0,
            num_return_sequences=args.group_size, max_new_tokens=args.max_new_tokens,
            eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
        )
    gen_time = since(tg)
    plen = enc["input_ids"].shape[1]
    comp = out[:, plen:]
    # completion mask: tokens up to and including the first EOS
    is_eos = comp == tok.eos_token_id
    after_eos = (is_eos.cumsum(-1) - is_eos.long()) > 0
    cmask = (~after_eos).long()
    texts = tok.batch_decode(comp, skip_special_tokens=True)
    answers = [p["answer"] for p in problems for _ in range(args.group_size)]
    correct = torch.tensor([float(is_correct(t, a)) for t, a in zip(texts, answers)])
    r = correct * 2 - 1  # +-1 rewards
    rg = r.view(-1, args.group_size)
    adv = ((rg - rg.mean(-1, keepdim=True)) / (rg.std(-1, keepdim=True) + 1e-4)).view(-1)
    keep = adv != 0 if args.skip_zero_groups else torch.ones_like(adv, dtype=torch.bool)
    stats = {"reward_mean": float(correct.mean()), "frac_zero_adv": float((adv == 0).float().mean()),
             "completion_len": float(cmask.sum(-1).float().mean()), "gen_cpu_s": gen_time["cpu_s"],
             "gen_tokens": int(cmask.sum())}
    if keep.sum() == 0:
        return stats | {"loss": 0.0}
    prompt_mask = enc["attention_mask"].repeat_interleave(args.group_size, 0)
    attn = torch.cat([prompt_mask, cmask], dim=1)[keep]
    ids = out[keep]
    pos = (attn.cumsum(-1) - 1).clamp(min=0)
    model.train()
    logits = model(input_ids=ids, attention_mask=attn, position_ids=pos).logits[:, plen - 1 : -1].float()
    logp = torch.log_softmax(logits, -1).gather(-1, comp[keep].unsqueeze(-1)).squeeze(-1)
    m = cmask[keep].float()
    loss = -(adv[keep].unsqueeze(-1) * logp * m).sum() / m.sum()
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), args.clip)
    opt.step()
    return stats | {"loss": float(loss.detach())}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seed", type=int, default=0, help="RL seed (sampling, prompt stream)")
    ap.add_argument("--sft-seed", type=int, default=None, help="warm-start seed (default: --seed)")
    ap.add_argument("--model-dir", default=None, help="load a saved policy instead of warm-starting one")
    ap.add_argument("--save-sft", default=None, help="save the warm-started policy here")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--prompts-per-step", type=int, default=16)
    ap.add_argument("--group-size", type=int, default=8)
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--max-new-tokens", type=int, default=72)
    ap.add_argument("--temperature", type=float, default=1.0)
    ap.add_argument("--clip", type=float, default=1.0)
    ap.add_argument("--skip-zero-groups", action="store_true")
    ap.add_argument("--n-eval", type=int, default=200)
    ap.add_argument("--eval-every", type=int, default=20)
    ap.add_argument("--sft-kwargs", default="{}", help="JSON overrides for warm_start()")
    args = ap.parse_args()

    torch.set_num_threads(args.threads)
    t0 = clock()
    if args.model_dir:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        model = AutoModelForCausalLM.from_pretrained(args.model_dir, dtype=torch.float32)
        tok = AutoTokenizer.from_pretrained(args.model_dir)
        sft = json.loads((Path(args.model_dir) / "warm_start.json").read_text())
    else:
        seed = args.sft_seed if args.sft_seed is not None else args.seed
        model, tok, sft = warm_start(args.save_sft, seed=seed, progress=False, **json.loads(args.sft_kwargs))
    sft_time = since(t0)
    torch.manual_seed(args.seed)
    held_out = generate_problems(args.seed, args.n_eval, "eval")
    te = clock()
    acc0 = accuracy(model, tok, held_out)
    eval_time = since(te)
    print(json.dumps({"step": 0, "held_out_acc": acc0, "sft": sft.get("sft"), "sft_time": sft_time,
                      "eval_time": eval_time}), flush=True)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.99), weight_decay=0.0)
    stream = iter_problems(args.seed + 1, "train")
    rl_wall = rl_cpu = 0.0
    hist = []
    acc = acc0
    for step in range(1, args.steps + 1):
        ts = clock()
        stats = rl_step(model, tok, opt, [next(stream) for _ in range(args.prompts_per_step)], args)
        d = since(ts)
        rl_wall += d["wall_s"]
        rl_cpu += d["cpu_s"]
        hist.append(stats["reward_mean"])
        if step % args.eval_every == 0 or step == args.steps:
            acc = accuracy(model, tok, held_out)
            print(json.dumps({"step": step, "held_out_acc": acc, "train_reward_last": round(sum(hist) / len(hist), 3),
                              "rl_wall_s": round(rl_wall, 1), "rl_cpu_s": round(rl_cpu, 1), **stats}), flush=True)
            hist = []
    summary = {
        "seed": args.seed, "sft_seed": args.sft_seed if args.sft_seed is not None else args.seed,
        "held_out_before": acc0, "held_out_after": acc, "gain_points": round(100 * (acc - acc0), 1),
        "rl_wall_s": round(rl_wall, 1), "rl_cpu_s": round(rl_cpu, 1),
        "sec_per_step_wall": round(rl_wall / args.steps, 2), "sec_per_step_cpu": round(rl_cpu / args.steps, 2),
        "settings": {k: v for k, v in vars(args).items() if k not in ("model_dir", "save_sft")},
        "total": since(t0),
    }
    print("SUMMARY " + json.dumps(summary), flush=True)


if __name__ == "__main__":
    main()
