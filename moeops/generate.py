"""`python -m moeops.generate`: text from an exported model in ONNX Runtime (KV cache), greedy or
top-p sampling with a seed.

    python -m moeops.generate --prompt "def main(" [--model exports/onnx/int8] [--max-new-tokens 64]
                              [--temperature 0.8 --top-p 0.9 --seed 0]
"""

from __future__ import annotations

import argparse
from pathlib import Path

from moeops.cli import UserError, run_main


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, default=Path("exports/onnx/int8"), help="an exports/onnx/<variant> dir")
    ap.add_argument("--prompt", required=True)
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    ap.add_argument("--top-p", type=float, default=1.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=0)
    a = ap.parse_args()
    for name in ("model.onnx", "tokenizer.json"):
        if not (a.model / name).is_file():
            raise UserError(f"{a.model / name}: missing (run `make pipeline`, or pass --model exports/onnx/<variant>)")
    from moeops.config import load_model_args
    from moeops.export.onnx import OnnxLM
    from moeops.model.generate import generate
    from moeops.model.io import load_tokenizer

    tok = load_tokenizer(a.model / "tokenizer.json")  # a garbled file is one line, like a corrupted model.onnx
    ids = tok.encode(a.prompt).ids
    if not ids:
        raise UserError("--prompt: encodes to no tokens")
    limit = load_model_args(a.model / "config.json").max_seq_len
    if len(ids) + a.max_new_tokens > limit:
        raise UserError(f"--max-new-tokens: prompt ({len(ids)} tokens) + {a.max_new_tokens} new tokens exceed the "
                        f"model's context of {limit}")
    eos = tok.token_to_id("<|endoftext|>")
    lm = OnnxLM(a.model / "model.onnx", threads=a.threads)
    out = generate(lm.step, [ids], a.max_new_tokens, a.temperature, a.top_p, a.seed, eos_id=eos)[0]
    print(a.prompt + tok.decode(out))


if __name__ == "__main__":
    run_main(main)
