"""Continuous batching through the whole server against the model's own batched speed.

Starts its own stack in a temporary data dir (`stack.Stack`: embedded Redis, SQLite or
PostgreSQL, gunicorn 2 x 32) with the same SmolLM2-135M-Instruct directory deployed
twice, so that one run compares the two side by side:

  `smollm2-b1`   `max_batch = 1`  (one job at a time, as before batching)
  `smollm2-b16`  `max_batch = 16` (continuously batched)
  `minilm`       `max_batch = 32` (`algorithms.embeddings:SentenceEmbedding`)

On the CPU, b1 runs on device `cpu` and b16 and minilm on `cpu:1`, each device with its
own worker process (only one case runs at a time, so they never compete); with
`--device cuda:0` all three share that device's one worker. The dtype is the server's
default ("auto"; the one torch picked is recorded, with the CPU's bf16 flags).

It measures, in ONE run (`batching_raw`, `batching_server`):

  1. the model in this process, no server: `TextGeneration.start_batch()` and plain
     `model.generate` on a left-padded batch, batch 1 and 16: the ceiling tokens/s and
     per-request latency;
  2. streamed `POST /v1/chat/completions` (64 new tokens, temperature 0, a distinct
     long-story prompt per call) from 1, 4 and 16 concurrent clients, on b1 and on b16:
     total tokens/s (usage tokens / wall time), TTFT and per-request latency p50/p99;
  3. a client that arrives while 15 others decode on b16: its TTFT against one client's
     alone;
  4. `POST /v1/embeddings` from 1 and 32 concurrent clients: inputs/s;

then prints four tables and the issue's aims (met / NOT met), and writes
`bench/results/batching.json`. Every process it starts is stopped on exit, error or
Ctrl-C.

    .venv/bin/python bench/batching.py [--rounds 2] [--device cpu] [--database sqlite|postgres] [--quick]
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import os
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from batching_raw import measure_raw
from batching_server import measure_chat, measure_embeddings, measure_late_joiner, story_prompt, warm_up
from batching_tables import aims, print_aims, print_chats, print_embeddings, print_late_joiner, print_raw
from cpu import wait_for_quiet
from report import RESULTS_DIR, print_request_errors, result_head, say, write_result
from stack import Stack, deployment_toml, install_signal_handlers, prepared_model, run_on_stack, server_toml

# isort: split
# After `stack`, which puts the project root on sys.path.
from algorithms.base import GenerationRequest
from algorithms.loader import build_algorithm

GEN_ALGORITHM = "algorithms.transformers_lm:TextGeneration"
EMBED_ALGORITHM = "algorithms.embeddings:SentenceEmbedding"
GEN_MODEL_DIR = "smollm2-135m-instruct"
ONE, BATCHED, EMBED = "smollm2-b1", "smollm2-b16", "minilm"
MAX_BATCH = {ONE: 1, BATCHED: 16, EMBED: 32}
CLIENT_COUNTS = (1, 4, 16)
EMBED_CLIENTS = (1, 32)
LATE_DECODERS = 15
DEFAULT_MODELS_DIR = Path("~/.local/share/djangollmapi/models").expanduser()  # where `preparemodels` puts them
WEB = (2, 32)  # what `serve` starts by default
VERSIONED = ("Django", "gunicorn", "celery", "redis", "torch", "transformers")


def placement(device: str) -> dict[str, str]:
    """Each deployment's device. On the CPU b1 gets its own (a worker process each, so
    b16's batch never waits behind b1's queue); elsewhere all share the one device."""
    if device == "cpu" or device.startswith("cpu:"):
        index = int(device.split(":")[1]) if ":" in device else 0
        other = f"cpu:{index + 1}"
        return {ONE: device, BATCHED: other, EMBED: other}
    return dict.fromkeys(MAX_BATCH, device)


def bench_config_toml(model_dir: Path, max_tokens: int, devices: dict[str, str]) -> Callable[[Path, int], str]:
    """The TOML writer the Stack calls with its temp dir and port. A queued chat on b1
    waits for the 15 before it (~1 min): the job timeout is raised well above that."""

    def write(tmp: Path, port: int) -> str:
        head = server_toml(
            "batching.py",
            tmp,
            port,
            web_workers=WEB[0],
            web_threads=WEB[1],
            default_model=BATCHED,
            max_queue_depth=10000,
            job_timeout_s=600,
        )
        gen_options = f'model_path = "{model_dir}", max_new_tokens = {max_tokens}'
        text = head + "\n[worker]\npreload = true\n"
        for name in (ONE, BATCHED):
            text += deployment_toml(name, GEN_ALGORITHM, devices[name], gen_options) + max_batch_line(name)
        return text + deployment_toml(EMBED, EMBED_ALGORITHM, devices[EMBED]) + max_batch_line(EMBED)

    return write


def max_batch_line(name: str) -> str:
    """Appended to a deployment's table (after its options line, still in that table)."""
    return f"max_batch = {MAX_BATCH[name]}\n"


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=2, help="streamed chats per client in each case (default 2)")
    parser.add_argument("--raw-rounds", type=int, default=2, help="in-process batches per case (default 2)")
    parser.add_argument("--max-tokens", type=int, default=64, help="max_tokens of each chat (default 64)")
    parser.add_argument("--embed-requests", type=int, default=256, help="embedding calls per case (default 256)")
    parser.add_argument("--device", default="cpu", help="cpu (b1 on cpu, b16 on cpu:1) or e.g. cuda:0 (default cpu)")
    parser.add_argument("--database", choices=("sqlite", "postgres"), default="sqlite")
    parser.add_argument("--models-dir", type=Path, default=DEFAULT_MODELS_DIR, help=f"default {DEFAULT_MODELS_DIR}")
    parser.add_argument("--quiet-wait", type=float, default=10, help="before each case, wait up to S s for quiet")
    parser.add_argument("--quick", action="store_true", help="smoke run: 16 tokens, 1 round, 64 embedding calls")
    parser.add_argument("--keep-tmp", action="store_true", help="keep the temp data dir (logs) even on success")
    args = parser.parse_args()
    if args.quick:
        args.max_tokens, args.rounds, args.raw_rounds, args.embed_requests = 16, 1, 1, 64
        args.quiet_wait = min(args.quiet_wait, 2)
    if min(args.rounds, args.raw_rounds, args.embed_requests) < 1 or args.max_tokens < 2:
        parser.error("--rounds, --raw-rounds and --embed-requests must be positive, --max-tokens at least 2")
    return args


def requests_for(batch: int, max_tokens: int) -> list[GenerationRequest]:
    """The in-process batch: the same prompts the server's first `batch` calls get."""
    return [
        GenerationRequest(max_tokens, messages=({"role": "user", "content": story_prompt(i)},), temperature=0.0)
        for i in range(batch)
    ]


def machine_facts(algorithm: Any) -> dict:
    """What decides the speed here: the dtype torch picked for "auto", and the CPU's
    bf16 support (without it "auto" means float32)."""
    import torch

    flags: set[str] = set()
    with contextlib.suppress(OSError):
        line = next((ln for ln in Path("/proc/cpuinfo").read_text().splitlines() if ln.startswith("flags")), "")
        flags = set(line.split(":", 1)[-1].split())
    return {
        "dtype": str(algorithm.dtype).removeprefix("torch."),
        "torch_device": str(algorithm.device),
        "cpu_avx512_bf16": "avx512_bf16" in flags,
        "cpu_amx_bf16": "amx_bf16" in flags,
        "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "torch_threads": torch.get_num_threads(),
        "cuda_device": torch.cuda.get_device_name(algorithm.device) if algorithm.device.type == "cuda" else None,
    }


def measure_ceiling(args: argparse.Namespace, model_dir: Path) -> tuple[list[dict], dict]:
    """Part 1, the model in this process (freed afterwards): cases and machine facts."""
    say("loading the model in this process")
    options = {"model_path": str(model_dir), "max_new_tokens": args.max_tokens}
    algorithm = build_algorithm(GEN_ALGORITHM, args.device, options)
    facts = machine_facts(algorithm)
    cases = measure_raw(algorithm, requests_for, args.max_tokens, args.raw_rounds)
    del algorithm
    gc.collect()
    return cases, facts


def run(args: argparse.Namespace, stack: Stack, model_dir: Path) -> dict:
    """Every case against a started stack, one at a time."""
    raw, facts = measure_ceiling(args, model_dir)
    say("warming up the web workers and the deployments")
    warm_up(stack, [ONE, BATCHED], MAX_BATCH[BATCHED], EMBED)
    chats = []
    for clients in CLIENT_COUNTS:
        for model in (ONE, BATCHED):
            wait_for_quiet(args.quiet_wait)
            chats.append(measure_chat(stack, model, MAX_BATCH[model], clients, args.rounds, args.max_tokens))
    wait_for_quiet(args.quiet_wait)
    joiner = measure_late_joiner(stack, BATCHED, LATE_DECODERS, args.rounds, args.max_tokens)
    embeddings = []
    for clients in EMBED_CLIENTS:
        wait_for_quiet(args.quiet_wait)
        embeddings.append(measure_embeddings(stack, EMBED, MAX_BATCH[EMBED], clients, args.embed_requests))
    return {"setup": facts, "raw": raw, "chats": chats, "late_joiner": joiner, "embeddings": embeddings}


def report(measured: dict, setup: dict) -> list[dict]:
    """Print the four tables and the aims; return the aims."""
    chats = {(c["max_batch"], c["clients"]): c for c in measured["chats"]}
    raw = {(c["kind"], c["batch"]): c for c in measured["raw"]}
    pairs = [(chats[MAX_BATCH[ONE], n], chats[MAX_BATCH[BATCHED], n]) for n in CLIENT_COUNTS]
    print_chats(pairs, setup)
    print_late_joiner(measured["late_joiner"], chats[MAX_BATCH[BATCHED], 1])
    print_embeddings(measured["embeddings"])
    print_raw(measured["raw"], setup)
    found = aims(chats, measured["late_joiner"], measured["embeddings"], raw)
    print_aims(found)
    return found


def result_json(args: argparse.Namespace, stack: Stack, model_dir: Path, devices: dict[str, str]) -> dict:
    """The result file's head and config; the caller adds the measurements."""
    return result_head("batching", VERSIONED) | {
        "config": {
            **stack.describe(),
            "web": f"gunicorn gthread {WEB[0]} workers x {WEB[1]} threads",
            "deployments": {name: {"device": devices[name], "max_batch": MAX_BATCH[name]} for name in MAX_BATCH},
            "workers": [f"manage.py runworker {device}" for device in stack.devices],
            "model_dir": str(model_dir),
            "prompt": story_prompt(0),
            "max_tokens": args.max_tokens,
            "rounds": args.rounds,
            "raw_rounds": args.raw_rounds,
            "embed_requests": args.embed_requests,
            "quick": args.quick,
            "toml": stack.config_text,
        }
    }


def main() -> int:
    args = parse_args()
    install_signal_handlers()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never reach for a model hub, here or in the workers
    model_dir = prepared_model(args.models_dir.expanduser().resolve(), GEN_MODEL_DIR)
    devices = placement(args.device)
    tmp = Path(tempfile.mkdtemp(prefix="dla-bench-batching-"))
    toml = bench_config_toml(model_dir, args.max_tokens, devices)
    stack = Stack(args.database, tmp, toml, list(dict.fromkeys(devices.values())), *WEB)
    measured, exit_code = run_on_stack(stack, tmp, args.keep_tmp, lambda: run(args, stack, model_dir))
    if measured is None:
        return exit_code
    setup = measured["setup"] | {
        "device": args.device,
        "max_tokens": args.max_tokens,
        "rounds": args.rounds,
        "raw_rounds": args.raw_rounds,
    }
    found = report(measured, setup)
    result = result_json(args, stack, model_dir, devices)
    result["config"].update(measured["setup"])
    result |= {k: measured[k] for k in ("raw", "chats", "late_joiner", "embeddings")} | {"aims": found}
    write_result(result, RESULTS_DIR / "batching.json")
    cases = [*measured["chats"], *measured["embeddings"]]
    errors = sum(c["errors"] for c in cases) + measured["late_joiner"]["errors"]
    if errors:
        print_request_errors(errors, cases, with_kinds=True)
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
