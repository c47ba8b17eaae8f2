"""Data checks (issue 27, item 8): a gold answer that is null, true/false, a list or an object, and text that is
not UTF-8, are errors naming file and line; prompt ids that repeat within a batch, from any data module, are a
named error (the completions of prompts sharing an id would be pooled into one group)."""

from __future__ import annotations

import json

import lightning as L
import pytest
from torch.utils.data import DataLoader

from test_resume import ToyPrompts, cli_fit_args, tokenizer_dir

from prpo_lightning.cli import cli_main
from prpo_lightning.data import DataFileError, DuplicatePromptIdError, read_jsonl
from prpo_lightning.evaluation.benchmarks import load_benchmark

GOOD = json.dumps({"problem": "1+1=", "answer": "2"})


@pytest.fixture(autouse=True)
def _plain_argv(monkeypatch):
    monkeypatch.setattr("sys.argv", ["prpo-fit"])


@pytest.fixture(scope="module")
def tok(tmp_path_factory) -> str:
    return tokenizer_dir(tmp_path_factory.mktemp("data_tok"))


def _jsonl(path, lines):
    path.write_bytes(b"\n".join(x if isinstance(x, bytes) else x.encode() for x in lines) + b"\n")
    return path


@pytest.mark.parametrize(("answer", "shown"), [(None, "null"), ([4], "a list"), ({"value": 4}, "an object"),
                                               (True, "true/false")])
def test_answer_that_is_not_text_or_a_number_names_file_and_line(tmp_path, tok, answer, shown):
    train = _jsonl(tmp_path / "train.jsonl", [GOOD, GOOD, json.dumps({"problem": "2+2=", "answer": answer}), GOOD])
    args = cli_fit_args(tmp_path, tok, 1, "--trainer.enable_checkpointing=false",
                        "--data=prpo_lightning.data.JsonlMathDataModule", f"--data.train_path={train}",
                        f"--data.eval_path={train}", "--data.batch_size=2")
    with pytest.raises(DataFileError, match=rf"{train}:3: field 'answer' is .* \({shown}\); it must be a string or a "
                                            r"number"):
        cli_main(args)  # before: trained against the gold string "None" / "[4]" / ...
    with pytest.raises(DataFileError, match=rf"{train}:3: field 'answer'"):
        load_benchmark(str(train))  # evaluation benchmarks read files the same way


def test_numbers_stay_accepted_and_problem_must_be_text(tmp_path):
    rows = read_jsonl(_jsonl(tmp_path / "a.jsonl", [json.dumps({"problem": "x?", "answer": 27.5}),
                                                    json.dumps({"problem": "y?", "answer": 3})]))
    assert [r["answer"] for r in rows] == ["27.5", "3"]
    with pytest.raises(DataFileError, match=r"b\.jsonl:1: field 'problem' is null \(null\); it must be a string"):
        read_jsonl(_jsonl(tmp_path / "b.jsonl", [json.dumps({"problem": None, "answer": "1"})]))


def test_invalid_utf8_names_file_and_line(tmp_path):
    path = _jsonl(tmp_path / "latin1.jsonl", [GOOD, GOOD, '{"problem": "caf\xe9 =", "answer": "1"}'.encode("latin-1")])
    with pytest.raises(DataFileError, match=rf"{path}:3: not valid UTF-8 \(byte 0xe9 at byte 17 of the line\)"):
        read_jsonl(path)
    bom = _jsonl(tmp_path / "bom.jsonl", [b"\xef\xbb\xbf" + GOOD.encode(), GOOD.encode()])
    assert len(read_jsonl(bom)) == 2  # a UTF-8 byte-order mark is fine


class RepeatedIds(L.LightningDataModule):
    """A custom data module with its own loader and collate function: ids 0, 1, 1, 2 (two different prompts
    share id 1)."""

    def train_dataloader(self):
        rows = [{"id": i, "problem": p, "answer": "2"} for i, p in zip([0, 1, 1, 2], ["1+1=", "2+0=", "0+2=", "3-1="])]

        def collate(batch):
            import torch

            return {"id": torch.tensor([r["id"] for r in batch]), "problem": [r["problem"] for r in batch],
                    "answer": [r["answer"] for r in batch]}

        return DataLoader(rows, batch_size=4, collate_fn=collate)


@pytest.mark.slow
def test_repeated_prompt_ids_from_any_data_module_are_named(tmp_path, tok):
    args = cli_fit_args(tmp_path, tok, 1, "--trainer.enable_checkpointing=false")
    custom = [a for a in args if not a.startswith("--data=")] + ["--data=test_data_checks.RepeatedIds"]
    with pytest.raises(DuplicatePromptIdError, match=r"training batch 0 of RepeatedIds: prompt ids repeat within one "
                                                     r"batch \(id 1 x2\) \(id 1: \['2\+0=', '0\+2='\]\)"):
        cli_main(custom)
    rows = [{"id": i % 3, "problem": f"{i}+{i}=", "answer": str(2 * i)} for i in range(6)]
    dm = ToyPrompts(rows=rows, batch_size=6)
    dm.setup("fit")
    with pytest.raises(DuplicatePromptIdError, match="prompt ids repeat"):
        next(iter(dm.train_dataloader()))  # the bundled collate function refuses them too
