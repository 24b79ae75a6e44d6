"""The peer that bench/serve.py measures our server against: what a user would otherwise put up.
A minimal FastAPI app exposing the same `/v1/completions` (streaming or not, the fields the bench
sends) over transformers' `AutoModelForCausalLM` loaded from exports/hf (transformers' own
DeepseekV3ForCausalLM, no custom code), generating one request at a time with `generate` and a
`TextIteratorStreamer`.

    python -m bench.hf_server [--model-dir exports/hf] [--port 8001] [--threads 2]

Accepted: model, prompt (a string), max_tokens / max_completion_tokens, temperature (0 = greedy),
top_p, seed, stream, stream_options.include_usage, ignore_eos (EOS suppressed until max_tokens, as
in vLLM). The port is bound after the model is loaded, so /health/ready answering means ready.
Not part of the product: a benchmark peer, it imports torch.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import threading
import time
import uuid
from pathlib import Path

import torch
import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from transformers import AutoModelForCausalLM, AutoTokenizer, TextIteratorStreamer


def error(status: int, message: str, param: str | None = None) -> JSONResponse:
    return JSONResponse({"error": {"message": message, "type": "invalid_request_error", "param": param,
                                   "code": None}}, status_code=status)


def parse(body: dict, max_len: int) -> dict | JSONResponse:
    """The generation settings of a request, or the 400 naming the first bad field."""
    prompt = body.get("prompt")
    if not isinstance(prompt, str) or not prompt:
        return error(400, "prompt: a non-empty string is required (this peer takes one prompt)", "prompt")
    max_tokens = body.get("max_completion_tokens", body.get("max_tokens", 16))
    if not isinstance(max_tokens, int) or not 1 <= max_tokens <= max_len:
        return error(400, f"max_tokens: an integer in 1..{max_len} is required", "max_tokens")
    temperature = body.get("temperature", 1.0)
    top_p = body.get("top_p", 1.0)
    if not isinstance(temperature, int | float) or temperature < 0:
        return error(400, "temperature: a number >= 0 is required", "temperature")
    if not isinstance(top_p, int | float) or not 0 < top_p <= 1:
        return error(400, "top_p: a number in (0, 1] is required", "top_p")
    return {"prompt": prompt, "max_tokens": max_tokens, "temperature": float(temperature), "top_p": float(top_p),
            "seed": body.get("seed"), "stream": bool(body.get("stream", False)),
            "include_usage": bool((body.get("stream_options") or {}).get("include_usage", False)),
            "ignore_eos": bool(body.get("ignore_eos", False))}


def create_app(model_dir: Path, model_name: str) -> FastAPI:
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    tok = AutoTokenizer.from_pretrained(model_dir)
    max_len = model.config.max_position_embeddings
    one_at_a_time = asyncio.Lock()  # the naive server: requests queue behind each other, no batching
    app = FastAPI(title="transformers peer (bench)")

    @app.get("/health/ready")
    @app.get("/health/live")
    async def health():
        return {"status": "ok"}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": model_name, "object": "model", "owned_by": "bench"}]}

    @app.post("/v1/completions")
    async def completions(request: Request):
        try:
            body = await request.json()
        except ValueError:
            return error(400, "body: not valid JSON")
        if not isinstance(body, dict):
            return error(400, "body: a JSON object is required")
        if body.get("model", model_name) != model_name:
            return error(404, f"model: {body.get('model')!r} is not served here", "model")
        p = parse(body, max_len)
        if isinstance(p, JSONResponse):
            return p
        ids_BS = tok(p["prompt"], return_tensors="pt").input_ids
        if ids_BS.shape[1] + p["max_tokens"] > max_len:
            return error(400, f"prompt: {ids_BS.shape[1]} tokens + max_tokens exceed the context {max_len}", "prompt")
        rid, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())

        def chunk(text: str, finish: str | None, usage: dict | None = None, choices: bool = True) -> str:
            obj = {"id": rid, "object": "text_completion", "created": created, "model": model_name,
                   "choices": [{"index": 0, "text": text, "logprobs": None, "finish_reason": finish}] if choices
                   else [], "usage": usage}
            return f"data: {json.dumps(obj)}\n\n"

        async def events():
            async with one_at_a_time:
                streamer = TextIteratorStreamer(tok, skip_prompt=True, skip_special_tokens=True)
                out: dict = {}

                def work():
                    try:
                        if p["seed"] is not None:
                            torch.manual_seed(int(p["seed"]))
                        sample = p["temperature"] > 0
                        with torch.inference_mode():
                            out["ids"] = model.generate(
                                ids_BS, attention_mask=torch.ones_like(ids_BS), max_new_tokens=p["max_tokens"],
                                min_new_tokens=p["max_tokens"] if p["ignore_eos"] else None, do_sample=sample,
                                temperature=p["temperature"] if sample else None,
                                top_p=p["top_p"] if sample else None, pad_token_id=tok.eos_token_id,
                                streamer=streamer)
                    except BaseException as e:  # surfaced below; the streamer must still end
                        out["error"] = e
                        streamer.end()

                thread = threading.Thread(target=work, daemon=True)
                thread.start()
                pieces = iter(streamer)
                while (piece := await asyncio.to_thread(next, pieces, None)) is not None:
                    if piece:
                        yield piece
                await asyncio.to_thread(thread.join)
                if "error" in out:
                    raise out["error"]
                n = int(out["ids"].shape[1] - ids_BS.shape[1])
                yield {"prompt_tokens": int(ids_BS.shape[1]), "completion_tokens": n,
                       "total_tokens": int(ids_BS.shape[1]) + n,
                       "finish": "length" if n >= p["max_tokens"] else "stop"}

        if not p["stream"]:
            items = [item async for item in events()]  # run to the end: the lock is released there
            *text, last = items
            usage = {k: last[k] for k in ("prompt_tokens", "completion_tokens", "total_tokens")}
            return {"id": rid, "object": "text_completion", "created": created, "model": model_name,
                    "choices": [{"index": 0, "text": "".join(text), "logprobs": None,
                                 "finish_reason": last["finish"]}], "usage": usage}

        async def sse():
            async for item in events():
                if isinstance(item, str):
                    yield chunk(item, None)
                else:
                    yield chunk("", item["finish"])
                    if p["include_usage"]:
                        usage = {k: item[k] for k in ("prompt_tokens", "completion_tokens", "total_tokens")}
                        yield chunk("", None, usage, choices=False)
            yield "data: [DONE]\n\n"

        return StreamingResponse(sse(), media_type="text/event-stream")

    return app


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m bench.hf_server", description=__doc__.split("\n\n")[0])
    ap.add_argument("--model-dir", type=Path, default=Path("exports/hf"))
    ap.add_argument("--model-name", default="moeops")
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=8001)
    ap.add_argument("--threads", type=int, default=2, help="torch intra-op threads")
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    app = create_app(a.model_dir, a.model_name)
    uvicorn.run(app, host=a.host, port=a.port, log_level="warning")


if __name__ == "__main__":
    main()
