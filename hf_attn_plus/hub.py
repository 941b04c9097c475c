"""Model cards and Hub upload for converted models and adapters (`hf-attn-plus push`)."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from huggingface_hub import CommitOperationAdd, HfApi, ModelCard, ModelCardData
from huggingface_hub.errors import HTTPError  # the HTTP client's base error: connection failures and Hub replies

from .registry import PREFIX, get_mechanism

TEMPLATE = Path(__file__).parent / "model_cards" / "model_card.md"
RECIPE_FILE = "recipe.json"  # optional record a recipe leaves next to the weights: {"name": value, ...}


class CardError(ValueError):
    """Something the model card needs is neither recorded in the model directory nor given on the command line."""


class PushError(RuntimeError):
    """The Hub could not be reached or refused the upload; the message says which step failed and what was published."""


def _read_json(path: Path) -> dict[str, Any] | None:
    return json.loads(path.read_text()) if path.is_file() else None


def recorded_mechanism(config: dict[str, Any] | None) -> tuple[str, dict[str, Any]] | None:
    """(mechanism name, options) from a saved config.json, or None if it uses no hf_attn_plus mechanism."""
    implementation = (config or {}).get("attn_implementation") or ""
    if not implementation.startswith(PREFIX):
        return None
    return implementation.removeprefix(PREFIX), dict(config.get("hf_attn_plus") or {})


def base_model_license(base_model: str) -> str | None:
    """The `license` of the base model's card: from a local directory, or from the Hub cache (never the network)."""
    readme = Path(base_model) / "README.md"
    if not readme.is_file():
        from huggingface_hub import try_to_load_from_cache

        cached = try_to_load_from_cache(base_model, "README.md")
        if not isinstance(cached, str):
            return None
        readme = Path(cached)
    return ModelCard.load(readme).data.license


def render_card(
    model_dir: str | os.PathLike,
    repo_id: str,
    *,
    base_model: str | None = None,
    license: str | None = None,
    mechanism: tuple[str, dict[str, Any]] | None = None,
    report: dict[str, Any] | None = None,
) -> ModelCard:
    """The card of a converted model (config.json) or a PEFT adapter (adapter_config.json) in `model_dir`.

    Mechanism, base model and recipe are read from the directory where recorded; arguments fill the gaps
    (and are required when nothing is recorded, rather than guessed). `report` is a `compare` JSON report."""
    from .compare import format_table

    model_dir = Path(model_dir)
    adapter = _read_json(model_dir / "adapter_config.json")
    config = _read_json(model_dir / "config.json")
    if adapter is None and config is None:
        raise CardError(f"{model_dir} has neither config.json (a model) nor adapter_config.json (a PEFT adapter)")
    base_model = base_model or (adapter or {}).get("base_model_name_or_path") or (config or {}).get("_name_or_path")
    if not base_model:
        raise CardError(f"no base model recorded in {model_dir}; pass --base-model")
    if mechanism is None:
        mechanism = recorded_mechanism(config) or recorded_mechanism(_read_json(Path(base_model) / "config.json"))
    if mechanism is None:
        raise CardError(f"no hf_attn_plus mechanism recorded in {model_dir}; pass --mechanism name:option=value,...")
    name, options = mechanism
    spec = get_mechanism(name)
    spec.resolve_options(options)
    license_from_base = license is None
    license = license or base_model_license(base_model)
    if not license:
        raise CardError(
            f"could not find the license of base model {base_model!r} (no model card found locally); pass --license"
        )

    on_hub = not Path(base_model).exists()  # a local path is no valid Hub `base_model`
    card_data = ModelCardData(
        base_model=base_model if on_hub else None,
        license=license,
        library_name="peft" if adapter else "transformers",
        tags=["hf_attn_plus", f"hf_attn_plus-{name}", f"{spec.family}-attention"] + (["lora"] if adapter else []),
    )
    measured = measured_on = None
    if report is not None:
        measured = format_table(report)
        env = report["environment"]
        measured_on = f"{report['model']}, {env['device']}, torch {env['torch']}, transformers {env['transformers']}"
    return ModelCard.from_template(
        card_data,
        template_path=str(TEMPLATE),
        model_name=repo_id.split("/")[-1],
        repo_id=repo_id,
        adapter=adapter is not None,
        base_model=base_model,
        base_model_link=f"https://huggingface.co/{base_model}" if on_hub else base_model,
        mechanism=name,
        attn_implementation=spec.attn_implementation,
        family=spec.family,
        training_free=spec.training_free,
        summary=spec.summary,
        options=options,
        recipe=_read_json(model_dir / RECIPE_FILE),
        measured=measured,
        measured_on=measured_on,
        license=license,
        license_from_base=license_from_base,
    )


def push(
    model_dir: str | os.PathLike,
    repo_id: str,
    card: ModelCard,
    *,
    token: str | None = None,
    endpoint: str | None = None,
    private: bool = False,
    commit_message: str = "Upload with hf-attn-plus push",
) -> str:
    """Create `repo_id` if needed and upload every file of `model_dir` plus the card as README.md in one commit.
    Returns the commit URL. `endpoint` defaults to huggingface_hub's (HF_ENDPOINT); HF_HUB_OFFLINE=1 blocks this."""
    model_dir = Path(model_dir)
    api = HfApi(endpoint=endpoint, token=token)
    files = sorted(p for p in model_dir.rglob("*") if p.is_file() and p.name != "README.md")
    operations = [CommitOperationAdd(str(p.relative_to(model_dir)), str(p)) for p in files]
    operations.append(CommitOperationAdd("README.md", str(card).encode()))
    try:
        api.create_repo(repo_id, private=private, exist_ok=True)
    except HTTPError as error:
        raise PushError(f"could not create repo {repo_id!r} on {api.endpoint}: {error}; nothing was published") from error
    try:
        return api.create_commit(repo_id, operations, commit_message=commit_message).commit_url
    except HTTPError as error:  # a commit is atomic: either all files land or none does
        raise PushError(
            f"repo {repo_id!r} exists on {api.endpoint} but the upload of {len(operations)} files failed: {error}; "
            "no commit was made, so none of them was published"
        ) from error
