"""Recipe data from local files: the split is by document, tokenised with the model's tokenizer, and each way a
corpus can be unusable (no file, a directory, no text column, too few documents, blocks too long) is an error that
names the bad input."""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

import pytest
from accelerate import Accelerator
from common import DataConfig, RecipeConfig, load_corpus, load_model
from lora_finetune import finetune
from transformers import AutoTokenizer, PreTrainedTokenizerBase

TEXT = Path(argparse.__file__).read_text()


def _documents(n: int, chars: int = 400) -> list[str]:
    return [TEXT[i * chars : (i + 1) * chars] for i in range(n)]


def _write_txt(folder: Path, documents: list[str]) -> str:
    folder.mkdir()
    for i, text in enumerate(documents):
        (folder / f"doc{i:02d}.txt").write_text(text)
    return str(folder / "*.txt")


def _corpus(source: str, tokenizer: PreTrainedTokenizerBase, **data: object):
    return load_corpus(DataConfig(source=source, **data), tokenizer, Accelerator(cpu=True))


@pytest.fixture(scope="module")
def tokenizer(tiny_teacher: Path) -> PreTrainedTokenizerBase:
    return AutoTokenizer.from_pretrained(tiny_teacher)


def test_every_tenth_file_is_held_out_tokenised_by_the_models_tokenizer(tokenizer, tmp_path: Path) -> None:
    documents = _documents(20)
    corpus = _corpus(_write_txt(tmp_path / "docs", documents), tokenizer)
    def ids(text: str) -> list[int]:
        return tokenizer(text, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    assert corpus.heldout["ids"] == [ids(documents[9]), ids(documents[19])]
    assert corpus.train["ids"] == [ids(d) for i, d in enumerate(documents) if i % 10 != 9]
    assert corpus.train_blocks(32).shape[1] == 32 and len(corpus.eval_blocks(32, 100)) > 0


def test_too_few_documents_for_a_heldout_split(tokenizer, tmp_path: Path) -> None:
    source = _write_txt(tmp_path / "six", _documents(6))  # the case: Column 'input_ids' doesn't exist
    with pytest.raises(ValueError, match=rf"data.source '{re.escape(source)}' gives 6 documents; .* at least 10 are needed"):
        _corpus(source, tokenizer)
    with pytest.raises(ValueError, match=r"gives 5 documents \(data.max_documents=5\)"):
        _corpus(_write_txt(tmp_path / "many", _documents(12)), tokenizer, max_documents=5)


def test_heldout_documents_too_short_for_one_block(tokenizer, tmp_path: Path) -> None:
    corpus = _corpus(_write_txt(tmp_path / "short", _documents(10, chars=40)), tokenizer)
    with pytest.raises(ValueError, match=r"no held-out block of 256 tokens: the 1 held-out documents of data.source "
                                         rf"'{re.escape(str(tmp_path / 'short' / '*.txt'))}' hold \d+ tokens"):
        corpus.eval_blocks(256, 8)
    with pytest.raises(ValueError, match=r"no training block of 4096 tokens: the 9 training documents"):
        corpus.train_blocks(4096)


def test_a_glob_that_matches_nothing_or_a_directory(tokenizer, tmp_path: Path) -> None:
    missing = str(tmp_path / "nowhere" / "*.txt")
    with pytest.raises(ValueError, match=rf"data.source '{re.escape(missing)}' matches no file"):
        _corpus(missing, tokenizer)
    with pytest.raises(ValueError, match=r"data.source 'corpus.jsonl' matches no file"):  # not taken for a Hub name
        _corpus("corpus.jsonl", tokenizer)
    folder = str(tmp_path / "folder")
    Path(folder).mkdir()
    with pytest.raises(ValueError, match=rf"'{re.escape(folder)}' is a directory; .* e.g. '{re.escape(folder)}/\*.txt'"):
        _corpus(folder, tokenizer)


def test_a_missing_text_column(tokenizer, tmp_path: Path) -> None:
    path = tmp_path / "corpus.jsonl"
    path.write_text("".join(json.dumps({"content": d}) + "\n" for d in _documents(10)))
    with pytest.raises(ValueError, match=r"data.text_field 'text' is not a column of data.source '.*corpus.jsonl'; "
                                         r"its columns: \['content'\]"):
        _corpus(str(path), tokenizer)
    assert len(_corpus(str(path), tokenizer, text_field="content").heldout) == 1


def test_blocks_longer_than_the_models_positions(tiny_teacher: Path) -> None:
    cfg = RecipeConfig(model=str(tiny_teacher))  # the tiny teacher has 512 positions
    with pytest.raises(ValueError, match=rf"data.seq_len=1024 is longer than model '{re.escape(str(tiny_teacher))}' has positions "
                                         r"\(max_position_embeddings=512\); allowed: at most 512"):
        load_model(cfg, Accelerator(cpu=True), {"data.seq_len": 1024})
    cfg.long_context.seq_len, cfg.long_context.eval_lengths = 256, [256, 600]
    with pytest.raises(ValueError, match=r"long_context.eval_lengths=600 is longer .* at most 512"):
        finetune(cfg, long_context=True)
