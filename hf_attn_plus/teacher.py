"""The embedded default teacher: a tiny Llama trained here, on text every machine has, with no downloads.

The corpus is the Python standard library source of the running interpreter (`sysconfig` "stdlib"): a fixed,
sorted list of `.py` files (tests and site-packages excluded), held out by file (every 10th). A byte-level BPE
tokenizer is trained on the training files, then a small Llama on packed blocks of them, with fixed seeds and
deterministic algorithms. The result is a normal `save_pretrained` directory, cached under
`~/.cache/hf_attn_plus/teacher-<spec>-py<X.Y>` (the stdlib differs between Python versions) and reused.

    python -m hf_attn_plus.teacher            # train (or find) the default teacher, print its held-out perplexity
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import math
import os
import sys
import sysconfig
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

HELD_OUT_EVERY = 10  # file i is held out when i % 10 == 9
SPECIAL_TOKENS = {"pad_token": "<pad>", "bos_token": "<s>", "eos_token": "</s>"}


@dataclasses.dataclass(frozen=True)
class TeacherSpec:
    vocab_size: int = 2048
    hidden_size: int = 128
    num_layers: int = 4
    num_heads: int = 4
    num_kv_heads: int = 2
    intermediate_size: int = 384
    max_position_embeddings: int = 2048
    seq_len: int = 256
    batch_size: int = 8
    steps: int = 400
    lr: float = 3e-3
    warmup_steps: int = 30
    max_files: int | None = None  # first N training files only (tests); None: all of them
    eval_blocks: int = 64
    seed: int = 0

    @property
    def key(self) -> str:
        """Cache-directory name: changes whenever any field, or the Python version (hence the corpus), changes."""
        digest = hashlib.sha256(json.dumps(dataclasses.asdict(self), sort_keys=True).encode()).hexdigest()[:10]
        return f"teacher-{digest}-py{sys.version_info.major}.{sys.version_info.minor}"


DEFAULT_SPEC = TeacherSpec()
# Seconds to train on two cores; for tests and smoke runs of the recipes.
TINY_SPEC = TeacherSpec(
    vocab_size=384, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2, intermediate_size=64,
    max_position_embeddings=512, seq_len=64, batch_size=8, steps=40, warmup_steps=5, max_files=20, eval_blocks=16,
)


def stdlib_files() -> list[Path]:
    """The fixed corpus: sorted `.py` files of this interpreter's standard library, without tests or site-packages."""
    root = Path(sysconfig.get_paths()["stdlib"])
    excluded = {"site-packages", "dist-packages", "test", "tests", "idle_test", "__pycache__"}
    files = [p for p in root.rglob("*.py") if not excluded & set(p.relative_to(root).parts[:-1])]
    return sorted(files, key=lambda p: p.relative_to(root).as_posix())


def stdlib_texts(split: str, max_files: int | None = None) -> list[str]:
    """'train' or 'heldout' files of the corpus, as text; the split is by file so no file is in both."""
    if split not in ("train", "heldout"):
        raise ValueError(f"split must be 'train' or 'heldout', got {split!r}")
    held = split == "heldout"
    files = [p for i, p in enumerate(stdlib_files()) if (i % HELD_OUT_EVERY == HELD_OUT_EVERY - 1) == held]
    return [p.read_text(encoding="utf-8", errors="replace") for p in files[:max_files]]


def train_tokenizer(texts: Sequence[str], vocab_size: int) -> PreTrainedTokenizerFast:
    """Byte-level BPE (GPT-2 style, so any text round-trips) with <pad>, <s>, </s>."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS.values()),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, **SPECIAL_TOKENS)


def pack(tokenizer: PreTrainedTokenizerFast, texts: Sequence[str], seq_len: int) -> torch.Tensor:
    """Documents joined with </s> and cut into [n_blocks, seq_len] token blocks (the ragged tail is dropped)."""
    ids: list[int] = []
    for encoded in tokenizer(list(texts), add_special_tokens=False)["input_ids"]:
        ids.extend(encoded)
        ids.append(tokenizer.eos_token_id)
    n_blocks = len(ids) // seq_len
    return torch.tensor(ids[: n_blocks * seq_len]).view(n_blocks, seq_len)


@torch.no_grad()
def token_nll(model: torch.nn.Module, blocks: torch.Tensor, batch_size: int = 8) -> tuple[float, int]:
    """(summed next-token loss, number of predicted tokens) over `blocks` [n, seq_len]."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    total, count = 0.0, 0
    for start in range(0, len(blocks), batch_size):
        batch = blocks[start : start + batch_size].to(device)
        logits = model(input_ids=batch, use_cache=False).logits[:, :-1].float()
        total += F.cross_entropy(logits.flatten(0, 1), batch[:, 1:].flatten(), reduction="sum").item()
        count += batch[:, 1:].numel()
    model.train(was_training)
    return total, count


def perplexity(model: torch.nn.Module, blocks: torch.Tensor, batch_size: int = 8) -> float:
    total, count = token_nll(model, blocks, batch_size)
    return math.exp(total / count)


def warmup_cosine(step: int, steps: int, warmup_steps: int, peak: float) -> float:
    """Learning rate at `step`: linear warm-up, then cosine decay to 10% of `peak`. A pure function of the step, so a
    resumed run gets exactly the rate an uninterrupted one would."""
    if step < warmup_steps:
        return peak * (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(1, steps - warmup_steps)
    return peak * (0.1 + 0.45 * (1 + math.cos(math.pi * min(progress, 1.0))))


def _model_config(spec: TeacherSpec, tokenizer: PreTrainedTokenizerFast) -> LlamaConfig:
    return LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=spec.hidden_size,
        intermediate_size=spec.intermediate_size,
        num_hidden_layers=spec.num_layers,
        num_attention_heads=spec.num_heads,
        num_key_value_heads=spec.num_kv_heads,
        max_position_embeddings=spec.max_position_embeddings,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        tie_word_embeddings=True,
    )


def _batches(blocks: torch.Tensor, spec: TeacherSpec) -> Iterator[torch.Tensor]:
    generator = torch.Generator().manual_seed(spec.seed)
    while True:
        for indices in torch.randperm(len(blocks), generator=generator).split(spec.batch_size):
            if len(indices) == spec.batch_size:
                yield blocks[indices]


def train_teacher(spec: TeacherSpec, out_dir: str | os.PathLike, log_every: int = 50) -> dict:
    """Train tokenizer and model from `spec`, save both to `out_dir`; returns the summary also saved as teacher.json."""
    start = time.time()
    torch.manual_seed(spec.seed)
    deterministic = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        train_texts = stdlib_texts("train", spec.max_files)
        tokenizer = train_tokenizer(train_texts, spec.vocab_size)
        train_blocks = pack(tokenizer, train_texts, spec.seq_len)
        eval_blocks = pack(tokenizer, stdlib_texts("heldout"), spec.seq_len)[: spec.eval_blocks]
        model = LlamaForCausalLM(_model_config(spec, tokenizer))
        model.config.attn_implementation = "sdpa"
        optimizer = torch.optim.AdamW(model.parameters(), lr=spec.lr, weight_decay=0.1, betas=(0.9, 0.95))
        model.train()
        for step, batch in zip(range(spec.steps), _batches(train_blocks, spec)):
            for group in optimizer.param_groups:
                group["lr"] = warmup_cosine(step, spec.steps, spec.warmup_steps, spec.lr)
            loss = model(input_ids=batch, labels=batch, use_cache=False).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            if log_every and (step % log_every == 0 or step == spec.steps - 1):
                print(f"teacher step {step:4d}/{spec.steps}  loss {loss.item():.3f}  {time.time() - start:.0f}s", flush=True)
        summary = {
            "spec": dataclasses.asdict(spec),
            "train_tokens": int(train_blocks.numel()),
            "tokens_seen": spec.steps * spec.batch_size * spec.seq_len,
            "heldout_tokens": int(eval_blocks.numel()),
            "heldout_perplexity": perplexity(model, eval_blocks),
            "train_seconds": round(time.time() - start, 1),
            "python": sys.version.split()[0],
            "torch": torch.__version__,
        }
    finally:
        torch.use_deterministic_algorithms(deterministic)
    out = Path(out_dir)
    tmp = out.with_name(out.name + f".tmp{os.getpid()}")
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    (tmp / "teacher.json").write_text(json.dumps(summary, indent=2))
    os.replace(tmp, out)  # atomic: a half-written teacher is never picked up from the cache
    return summary


def cache_dir() -> Path:
    return Path(os.environ.get("HF_ATTN_PLUS_CACHE", Path.home() / ".cache" / "hf_attn_plus"))


def teacher_path(spec: TeacherSpec = DEFAULT_SPEC, root: str | os.PathLike | None = None) -> Path:
    """Directory of the teacher for `spec`, trained first if it is not cached yet."""
    path = Path(root) if root is not None else cache_dir()
    path = path / spec.key
    if not (path / "teacher.json").exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        train_teacher(spec, path)
    return path


def heldout_blocks(tokenizer: PreTrainedTokenizerFast, seq_len: int, n_blocks: int) -> torch.Tensor:
    """The first `n_blocks` held-out blocks: the evaluation text of every recipe that uses the stdlib corpus."""
    return pack(tokenizer, stdlib_texts("heldout"), seq_len)[:n_blocks]


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true", help="the seconds-long test teacher instead of the default")
    parser.add_argument("--cache-dir", default=None, help="default: $HF_ATTN_PLUS_CACHE or ~/.cache/hf_attn_plus")
    args = parser.parse_args(argv)
    path = teacher_path(TINY_SPEC if args.tiny else DEFAULT_SPEC, args.cache_dir)
    summary = json.loads((path / "teacher.json").read_text())
    print(f"teacher: {path}")
    print(f"held-out perplexity {summary['heldout_perplexity']:.2f} on {summary['heldout_tokens']} tokens; "
          f"trained in {summary['train_seconds']} s")


if __name__ == "__main__":
    main()
