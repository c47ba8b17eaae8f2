"""The Markdown summary (``gpu_check.md``) of a GPU-check report (``gpu_check.json``, see ``gpu_check.py``)."""

from __future__ import annotations

from typing import Any

TRAIN_SECTIONS = ("train_grpo", "train_prpo", "train_zero2", "train_zero3", "resume", "resume_zero2", "train_zero3_prpo")
EXPORT_SECTIONS = ("export", "export_zero2")
TAIL_LINES = 15


def _num(x: Any, digits: int = 3) -> str:
    if x is None:
        return "–"
    if isinstance(x, bool):
        return "yes" if x else "no"
    if isinstance(x, float):
        return f"{x:.{digits}g}"
    return str(x)


def _note(entry: dict[str, Any]) -> str:
    """One line per section: the skip reason, the failed checks, or the last line of the error."""
    if entry["status"] == "skipped":
        return entry.get("skip_reason", "")
    failed = [k for k, c in entry.get("checks", {}).items() if c.get("passed") is False]
    if entry.get("error"):
        return "error: " + entry["error"].strip().splitlines()[-1][:200]
    return ("failed checks: " + ", ".join(failed)) if failed else ""


def _environment(res: dict[str, Any]) -> list[str]:
    v = res.get("versions", {})
    imports = ", ".join(f"{k} {'ok' if i.get('ok') else 'FAILED: ' + i.get('error', '')}"
                        for k, i in res.get("imports", {}).items())
    return [
        "## Environment", "",
        f"GPU: {res.get('gpu', 'none (CPU)')} (capability {res.get('capability', '–')}, "
        f"{res.get('gpu_memory_gib', '–')} GiB), nvidia-smi: {res.get('nvidia_smi', '–')}.  ",
        f"Python {res.get('python')}, torch {v.get('torch')} (CUDA {res.get('torch_cuda')}), transformers "
        f"{v.get('transformers')}, lightning {v.get('lightning')}, deepspeed {v.get('deepspeed')}, jsonargparse "
        f"{v.get('jsonargparse')}, latex2sympy2_extended {v.get('latex2sympy2_extended')}, pydantic "
        f"{v.get('pydantic')}, vllm {v.get('vllm')}.  ",
        f"Imports: {imports}.  ",
        f"Measured bf16 matmul peak: **{_num(res.get('bf16_peak_tflops'), 4)} TFLOP/s** "
        f"({res.get('bf16_peak_formula', '')}).", "",
    ]


def _decoder(entry: dict[str, Any]) -> list[str]:
    res, checks = entry.get("results", {}), entry.get("checks", {})
    lines = ["## Decoder and log-probs", "",
             f"{res.get('rows', '–')} rows (prompts × G), prompt length ≤ {res.get('prompt_len', '–')}, "
             f"{res.get('new_tokens', '–')} new tokens, {_num(res.get('parameters'))} parameters.", "",
             "| check | passed | detail |", "|---|---|---|"]
    for name, c in checks.items():
        if "rows_identical" in c:
            detail = (f"{c['rows_identical']}/{c['rows']} rows identical, earliest divergence (row, pos) "
                      f"{c['first_mismatch_row_pos']}, shapes {c['hf_shape']} / {c['static_shape']}, "
                      f"{c['rows_with_eos']} rows with EOS")
            if "hf_seconds" in c:
                detail += f", HF {c['hf_seconds']} s, static {c['static_seconds']} s"
            gaps = [g["top1_minus_top2"] for g in c.get("divergence_gaps", [])]
            if gaps:
                detail += (f"; top-1 − top-2 logit gap where rows diverged: {_num(min(gaps))}–{_num(max(gaps))}"
                           f" (near-tie tolerance {_num(c.get('tie_tol'))})")
        else:
            detail = (f"log-prob {_num(c.get('logprob_max_abs_diff'))}, entropy {_num(c.get('entropy_max_abs_diff'))},"
                      f" gradient {_num(c.get('grad_max_abs_diff'))} (relative {_num(c.get('grad_rel_diff'))}); "
                      f"tolerance {_num(c.get('tolerance'))}")
        lines.append(f"| {name} | {_num(c.get('passed'))} | {detail} |")
    return lines + [""]


def _training(sections: dict[str, Any]) -> list[str]:
    lines = ["## Training runs (`prpo-fit fit`, bf16)", "",
             "| run | status | exit | seconds | steps | final loss | final reward | peak GPU GiB | parameters | "
             "layers |", "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for name in TRAIN_SECTIONS:
        e = sections.get(name)
        if e is None:
            continue
        r = e.get("results", {})
        steps = f"{_num(r.get('steps_reached'))}/{_num(r.get('expected_steps'))}" if r else "–"
        lines.append(f"| {name} | {e['status']} | {_num(r.get('exit_code'))} | {_num(r.get('seconds'))} | {steps} | "
                     f"{_num(r.get('final_loss'))} | {_num(r.get('final_reward'))} | {_num(r.get('peak_memory_gib'))} |"
                     f" {_num(r.get('policy_parameters'))} | {_num(r.get('layers'))} |")
    for name in EXPORT_SECTIONS:
        e = sections.get(name)
        if e is not None and e.get("results"):
            r = e["results"]
            lines.append(f"\n`{name}`: {e['status']}, exit {_num(r.get('exit_code'))}, {_num(r.get('seconds'))} s, "
                         f"{_num(r.get('parameters'))} parameters ({', '.join(r.get('dtypes', []))}) from "
                         f"`{r.get('exported_from')}`.")
    return lines + [""]


def _throughput(entry: dict[str, Any]) -> list[str]:
    res = entry.get("results", {})
    lines = ["## Throughput (bf16)", "", f"Engines: {res.get('engines')}.", "",
             "| engine | batch | new tokens | tokens/s | seconds | peak GiB |", "|---|---:|---:|---:|---:|---:|"]
    for g in res.get("generation", []):
        if "skipped" in g:
            lines.append(f"| {g['engine']} | {g['batch']} | – | {g['skipped']} | | |")
        else:
            lines.append(f"| {g['engine']} | {g['batch']} | {g['new_tokens']} | {g['tokens_per_s']} | {g['seconds']} "
                         f"| {g['peak_memory_gib']} |")
    lines += ["", "| update pass | rows × tokens | seconds (median) | TFLOP/s | MFU | peak GiB |",
              "|---|---:|---:|---:|---:|---:|"]
    for u in res.get("update_pass", []):
        name = "shared prompts" if u.get("share_prompts") else "plain"
        if "skipped" in u:
            lines.append(f"| {name} | {u['skipped']} | | | | |")
        else:
            lines.append(f"| {name} | {u['rows']} × {u['tokens'] // max(u['rows'], 1)} | {_num(u['seconds_median'])} | "
                         f"{_num(u['tflops_per_s'])} | {_num(u['mfu'])} | {u['peak_memory_gib']} |")
    return lines + ["", res.get("mfu_formula", ""), ""]


def _packing(entry: dict[str, Any]) -> list[str]:
    res, checks = entry.get("results", {}), entry.get("checks", {})
    sdpa, flash = checks.get("fp32_packed_vs_padded_sdpa", {}), checks.get("flash_attention_2_packed", {})
    lines = ["## Packing (issue 24)", "",
             f"Packed vs padded, SDPA fp32: log-probs {_num(sdpa.get('logprob_max_abs_diff'))}, entropies "
             f"{_num(sdpa.get('entropy_max_abs_diff'))}, relative gradients {_num(sdpa.get('grad_rel_diff'))} (max abs "
             f"differences, tolerance {sdpa.get('tolerance')}). Flash-attention 2 varlen: "
             + (flash["skipped"] if "skipped" in flash else
                f"other rows bit-identical {flash.get('other_rows_bit_identical')}, bf16 vs padded SDPA mean/max "
                f"{_num(flash.get('bf16_vs_padded_sdpa_mean_abs_diff'))}/"
                f"{_num(flash.get('bf16_vs_padded_sdpa_max_abs_diff'))}") + ".", "",
             f"Update pass over {res.get('rows')} rows ({res.get('completion_tokens')} completion tokens, longest "
             f"{res.get('max_len')}), {res.get('dtype')}; padded/packed: {res.get('padded_micro_batch_rows')} rows per "
             f"micro-batch, budget: {res.get('micro_batch_tokens')} tokens; memory: {res.get('memory')}.", "",
             "| configuration | seconds | peak GiB | time vs padded | memory vs padded |", "|---|---:|---:|---:|---:|"]
    for u in res.get("update_pass", []):
        if "skipped" in u:
            lines.append(f"| {u['config']} | {u['skipped']} | | | |")
        else:
            lines.append(f"| {u['config']} | {u['seconds']} | {u['peak_memory_gib']} | {u.get('time_vs_padded')} | "
                         f"{u.get('memory_vs_padded')} |")
    return lines + [""]


def markdown(report: dict[str, Any]) -> str:
    """Render ``report`` as Markdown: a status table, then one part per section family, then failure tails."""
    sections = report["sections"]
    env = sections.get("environment", {}).get("results", {})
    where = "CPU dry run" if report["dry_run"] else env.get("gpu", "GPU")
    s = report.get("summary", {})
    lines = [f"# GPU check: {where}", "",
             f"Started {report['started_utc']} UTC, wall {report.get('wall_s')} s (deadline "
             f"{report['profile']['deadline_s']:.0f} s). Command: `{report['command']}`.  ",
             f"Sections: {s.get('passed', 0)} passed, {s.get('failed', 0)} failed, {s.get('skipped', 0)} skipped.", "",
             "| section | status | seconds / budget | note |", "|---|---|---:|---|"]
    for name, e in sections.items():
        lines.append(f"| {name} | **{e['status']}** | {e['seconds']:.1f} / {e['budget_s']:.0f} | {_note(e)} |")
    lines.append("")
    if env:
        lines += _environment(env)
    if "decoder" in sections and sections["decoder"].get("checks"):
        lines += _decoder(sections["decoder"])
    lines += _training(sections)
    if "throughput" in sections and sections["throughput"].get("results"):
        lines += _throughput(sections["throughput"])
    if "packing" in sections and sections["packing"].get("results"):
        lines += _packing(sections["packing"])
    tails = [(n, e.get("error") or e.get("results", {}).get("output_tail")) for n, e in sections.items()
             if e["status"] == "failed"]
    if any(t for _, t in tails):
        lines += ["## Failures", ""]
        for name, tail in tails:
            if tail:
                lines += [f"### {name}", "", "```", *tail.strip().splitlines()[-TAIL_LINES:], "```", ""]
    for note in report["profile"].get("notes", []):
        lines.append(f"Note: {note}.")
    return "\n".join(lines) + "\n"
