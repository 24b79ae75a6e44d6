"""Hugging Face export: a moeops model directory -> a directory that
`AutoModelForCausalLM.from_pretrained` / `AutoTokenizer.from_pretrained` load as transformers'
DeepseekV3ForCausalLM and a PreTrainedTokenizerFast, with no custom code (no trust_remote_code).

Our state dict already uses DeepseekV3's parameter names and shapes (moeops/model/hf.py), so the
weights are written as they are; only the config, generation config and tokenizer files are new.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors.torch import save_file

from moeops.cli import UserError
from moeops.config import ModelArgs
from moeops.io import replace_dir, sha256_file
from moeops.model.hf import hf_config_dict
from moeops.model.io import load_model_dir
from moeops.model.transformer import Transformer


def check_hf_representable(args: ModelArgs, config_path: Path) -> None:
    """Refuse a model whose DeepseekV3 twin would compute something else."""
    if args.score_func != "sigmoid":
        raise UserError(f"{config_path}: score_func: {args.score_func!r} has no transformers DeepseekV3 "
                        "equivalent (it scores experts with sigmoid only); cannot export to Hugging Face format")


def hf_config_json(args: ModelArgs) -> dict:
    """config.json through transformers' own DeepseekV3Config, so that every field it expects is
    present and spelled as its loader reads it."""
    from transformers import DeepseekV3Config

    fields = {k: v for k, v in hf_config_dict(args).items() if k != "model_type"}
    config = DeepseekV3Config(**fields, dtype="float32")
    out = config.to_dict()
    out["torch_dtype"] = "float32"  # transformers < 4.56 reads this name; 5.x reads "dtype"
    return out


def generation_config_json(config: dict) -> dict:
    from transformers import GenerationConfig

    gen = GenerationConfig(bos_token_id=config["bos_token_id"], eos_token_id=config["eos_token_id"],
                           # No pad token in our vocabulary: batched generate pads with EOS (masked out).
                           pad_token_id=config["eos_token_id"], do_sample=False)
    return gen.to_dict()


def tokenizer_special_token(tokenizer_path: Path, token_id: int) -> str:
    """The text of special token `token_id` (our EOS, moeops/data/prepare.py) in tokenizer.json."""
    try:
        tok = json.loads(tokenizer_path.read_text())
        added = {t["id"]: t for t in tok["added_tokens"]}
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise UserError(f"{tokenizer_path}: not a tokenizers tokenizer.json ({e})") from None
    entry = added.get(token_id)
    if entry is None or not entry.get("special"):
        raise UserError(f"{tokenizer_path}: id {token_id} is not a special token (the model's EOS must be)")
    return entry["content"]


def tokenizer_vocab_size(tokenizer_path: Path) -> int:
    from tokenizers import Tokenizer

    try:
        return Tokenizer.from_file(str(tokenizer_path)).get_vocab_size()
    except Exception as e:  # tokenizers raises plain Exception for a malformed file
        raise UserError(f"{tokenizer_path}: cannot load ({str(e).splitlines()[0]})") from None


def tokenizer_config_json(eos: str, max_len: int) -> dict:
    """GPT-2 convention: a byte-level BPE with one special token uses it as bos, eos, unk and pad.
    No BOS is added on encode (our training data has none) and decode does not touch spaces,
    so text round-trips exactly as with the `tokenizers` library."""
    return {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": eos,
        "eos_token": eos,
        "unk_token": eos,
        "pad_token": eos,
        "add_bos_token": False,
        "add_eos_token": False,
        "clean_up_tokenization_spaces": False,
        "model_max_length": max_len,
    }


def hf_state_dict(model: Transformer) -> dict[str, torch.Tensor]:
    """Our state dict, plus the zero-width shared experts that DeepseekV3 always builds (a model with
    n_shared_experts 0 has none; empty tensors load cleanly and add nothing to the output)."""
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    if model.args.n_shared_experts == 0:
        D = model.args.dim
        for i in range(model.args.first_k_dense_replace, model.args.n_layers):  # the MoE layers
            prefix = f"model.layers.{i}.mlp.shared_experts"
            state[f"{prefix}.gate_proj.weight"] = torch.zeros(0, D)
            state[f"{prefix}.up_proj.weight"] = torch.zeros(0, D)
            state[f"{prefix}.down_proj.weight"] = torch.zeros(D, 0)
    return state


def write_json(path: Path, obj: dict) -> None:
    path.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n")


def export_hf(model_dir: Path, out_dir: Path) -> None:
    """Write `out_dir` (config.json, generation_config.json, model.safetensors, tokenizer.json,
    tokenizer_config.json, special_tokens_map.json, lineage.json) in a temp directory next to it,
    then swap it in with one rename: a failure leaves the previous `out_dir` (or none)."""
    model_dir, out_dir = Path(model_dir), Path(out_dir)
    model = load_model_dir(model_dir)  # UserError for a missing or broken model
    args = model.args
    check_hf_representable(args, model_dir / "config.json")
    tokenizer_path = model_dir / "tokenizer.json"
    if not tokenizer_path.is_file():
        raise UserError(f"{tokenizer_path}: missing (is {model_dir} a model directory?)")
    config = hf_config_json(args)
    eos = tokenizer_special_token(tokenizer_path, config["eos_token_id"])
    n_tokens = tokenizer_vocab_size(tokenizer_path)
    if n_tokens > args.vocab_size:
        raise UserError(f"{tokenizer_path}: {n_tokens} tokens > model vocab_size {args.vocab_size}")
    tok_config = tokenizer_config_json(eos, args.max_seq_len)

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out_dir.parent, prefix=f".{out_dir.name}.tmp-"))
    try:
        # metadata format "pt": transformers refuses a safetensors file without it
        save_file(hf_state_dict(model), tmp / "model.safetensors", metadata={"format": "pt"})
        write_json(tmp / "config.json", config)
        write_json(tmp / "generation_config.json", generation_config_json(config))
        shutil.copyfile(tokenizer_path, tmp / "tokenizer.json")  # byte-identical: same ids as training
        write_json(tmp / "tokenizer_config.json", tok_config)
        write_json(tmp / "special_tokens_map.json", {k: tok_config[k] for k in
                                                     ("bos_token", "eos_token", "unk_token", "pad_token")})
        if (model_dir / "lineage.json").is_file():  # the export describes itself like its source ...
            record = json.loads((model_dir / "lineage.json").read_text())
            # ... with the checksums of its own files (verify_checksums reads them)
            record["checksums"] = {n: sha256_file(tmp / n) for n in ("model.safetensors", "tokenizer.json")}
            write_json(tmp / "lineage.json", record)
        replace_dir(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
