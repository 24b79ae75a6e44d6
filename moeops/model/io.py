"""A model directory describes itself: model.safetensors, config.json (the ModelArgs),
tokenizer.json and lineage.json. Later stages load it without reading params.yaml."""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from moeops.cli import UserError
from moeops.config import load_model_args, save_model_args
from moeops.io import replace_dir, sha256_file
from moeops.lineage import verify_checksums
from moeops.model.transformer import Transformer


def save_model_dir(out_dir: str | Path, model: Transformer, tokenizer_path: str | Path, lineage: dict) -> None:
    """Write the whole directory next to its destination, then swap it in with a rename."""
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out_dir.parent, prefix=f".{out_dir.name}.tmp-"))
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    save_file(state, tmp / "model.safetensors", metadata={"format": "pt"})
    (tmp / "config.json").write_text(save_model_args(model.args) + "\n")
    shutil.copyfile(tokenizer_path, tmp / "tokenizer.json")
    checksums = {name: sha256_file(tmp / name) for name in ("model.safetensors", "config.json", "tokenizer.json")}
    (tmp / "lineage.json").write_text(json.dumps({**lineage, "checksums": checksums}, indent=2, sort_keys=True) + "\n")
    replace_dir(tmp, out_dir)


def load_tokenizer(path: str | Path):
    """A tokenizers.Tokenizer, or a one-line UserError for a missing or garbled tokenizer.json."""
    from tokenizers import Tokenizer

    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: missing")
    try:
        return Tokenizer.from_file(str(path))
    except Exception as e:  # tokenizers raises a bare Exception for a file it cannot parse
        raise UserError(f"{path}: not a tokenizer ({str(e).splitlines()[0] if str(e) else type(e).__name__})") \
            from None


def load_model_dir(model_dir: str | Path) -> Transformer:
    model_dir = Path(model_dir)
    for name in ("model.safetensors", "config.json"):
        if not (model_dir / name).is_file():
            raise UserError(f"{model_dir / name}: missing (is {model_dir} a model directory?)")
    verify_checksums(model_dir)
    args = load_model_args(model_dir / "config.json")
    model = Transformer(args)
    try:
        state = load_file(model_dir / "model.safetensors")
        model.load_state_dict(state, strict=True)
    except (SafetensorError, RuntimeError, OSError) as e:
        raise UserError(f"{model_dir / 'model.safetensors'}: cannot load ({str(e).splitlines()[0]})") from None
    return model.eval()
