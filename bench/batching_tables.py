"""The tables and aims of bench/batching.py: rows of strings from its case dicts.

Four tables (the chats through the server side by side, the late joiner, embeddings,
the in-process ceiling) and the issue's four aims, each computed once (`aims`) so the
printout and the JSON say the same.
"""

from __future__ import annotations

from collections.abc import Sequence

from report import fmt, fmt_ratio, fmt_share, print_columns, print_table

NAN = float("nan")


def ms(summary: dict, key: str, digits: int = 0) -> str:
    return fmt(summary.get(key), digits)


def seconds(summary: dict, key: str) -> str:
    value = summary.get(key)
    return fmt(value / 1000 if value is not None else None, 2)


def tokens_cell(case: dict) -> str:
    mean, low = case.get("completion_tokens_mean"), case.get("completion_tokens_min")
    return "-" if mean is None else f"{mean:.1f} (min {low})"


# ---------------------------------------------------------------- chats


def chat_row(case: dict) -> list[str]:
    jobs = case["jobs"]
    return [
        case["case"],
        str(case["max_batch"]),
        str(case["clients"]),
        str(case["ok"]),
        str(case["errors"]),
        tokens_cell(case),
        fmt(case["tokens_per_s"], 1),
        ms(case["ttft"], "p50_ms"),
        ms(case["ttft"], "p99_ms"),
        seconds(case, "p50_ms"),
        seconds(case, "p99_ms"),
        fmt(jobs.get("batch_size", {}).get("mean"), 1),
        fmt(jobs.get("batch_size", {}).get("max"), 0),
        fmt(jobs.get("queue_wait_ms", {}).get("p50"), 0),
        fmt_share(case["other_processes_cpu_share"]),
    ]


def chat_ratio_row(one: dict, batched: dict) -> list[str]:
    """max_batch 16 over max_batch 1 at the same client count."""
    return [
        f"  max_batch {batched['max_batch']} / max_batch {one['max_batch']}",
        "",
        "",
        "",
        "",
        "",
        fmt_ratio(batched["tokens_per_s"], one["tokens_per_s"]),
        fmt_ratio(batched["ttft"]["p50_ms"], one["ttft"]["p50_ms"]),
        fmt_ratio(batched["ttft"]["p99_ms"], one["ttft"]["p99_ms"]),
        fmt_ratio(batched["p50_ms"], one["p50_ms"]),
        fmt_ratio(batched["p99_ms"], one["p99_ms"]),
        "",
        "",
        "",
        "",
    ]


CHAT_HEADER = [
    "case",
    "max_batch",
    "clients",
    "ok",
    "err",
    "tokens mean",
    "tok/s",
    "TTFT ms p50",
    "p99",
    "latency s p50",
    "p99",
    "batch mean",
    "max",
    "queue ms p50",
    "others",
]


def print_chats(pairs: Sequence[tuple[dict, dict]], setup: dict) -> None:
    print(
        f"\n1. streamed chat through the server: SmolLM2-135M-Instruct ({setup['dtype']}, device "
        f"{setup['device']}), max_tokens {setup['max_tokens']}, temperature 0, {setup['rounds']} chats per client; "
        "batch = the most jobs a job shared a step with (its row's batch_size)"
    )
    rows: list[list[str]] = []
    for one, batched in pairs:
        rows += [chat_row(one), chat_row(batched), chat_ratio_row(one, batched)]
    print_table(CHAT_HEADER, rows)


# ---------------------------------------------------------------- the late joiner


def print_late_joiner(joiner: dict, single: dict) -> None:
    print(f"\n2. a client arriving while {joiner['decoders']} decode ({joiner['model']}), {joiner['rounds']} rounds")
    columns = [
        ("case", lambda c: c["case"]),
        ("TTFT ms p50", lambda c: ms(c["joiner_ttft"], "p50_ms")),
        ("max", lambda c: ms(c["joiner_ttft"], "max_ms")),
        ("1 client alone TTFT ms p50", lambda c: ms(single["ttft"], "p50_ms")),
        ("ratio", lambda c: fmt_ratio(c["joiner_ttft"]["p50_ms"], single["ttft"]["p50_ms"])),
        ("still decoding (min)", lambda c: str(c["still_decoding_min"])),
        ("joiner's batch", lambda c: ",".join(fmt(b, 0) for b in c["joiner_batch_size"])),
        ("errors", lambda c: str(c["errors"])),
    ]
    print_columns(columns, [joiner])


# ---------------------------------------------------------------- embeddings


def print_embeddings(cases: Sequence[dict]) -> None:
    print("\n3. POST /v1/embeddings (MiniLM), one input per call")
    columns = [
        ("case", lambda c: c["case"]),
        ("max_batch", lambda c: str(c["max_batch"])),
        ("clients", lambda c: str(c["clients"])),
        ("ok", lambda c: str(c["ok"])),
        ("err", lambda c: str(c["errors"])),
        ("inputs/s", lambda c: fmt(c["inputs_per_s"], 1)),
        ("vs 1 client", lambda c: fmt_ratio(c["inputs_per_s"], cases[0]["inputs_per_s"])),
        ("p50 ms", lambda c: fmt(c["p50_ms"], 1)),
        ("p99 ms", lambda c: fmt(c["p99_ms"], 1)),
        ("others", lambda c: fmt_share(c["other_processes_cpu_share"])),
    ]
    print_columns(columns, cases)


# ---------------------------------------------------------------- the ceiling


def print_raw(cases: Sequence[dict], setup: dict) -> None:
    print(
        f"\n4. the model in this process (no server), max_tokens {setup['max_tokens']}, "
        f"{setup['raw_rounds']} rounds; latency = the call to the request's completion"
    )
    rows = []
    for kind in dict.fromkeys(c["kind"] for c in cases):
        mine = [c for c in cases if c["kind"] == kind]
        rows += [raw_row(c) for c in mine]
        if len(mine) == 2:
            rows.append(raw_ratio_row(*mine))
    header = ["case", "requests", "tokens mean", "tok/s", "TTFT ms p50", "latency s p50", "p99"]
    print_table(header, rows)


def raw_row(case: dict) -> list[str]:
    return [
        case["case"],
        str(case["requests"]),
        tokens_cell(case),
        fmt(case["tokens_per_s"], 1),
        ms(case["ttft"], "p50_ms"),
        seconds(case["latency"], "p50_ms"),
        seconds(case["latency"], "p99_ms"),
    ]


def raw_ratio_row(one: dict, batched: dict) -> list[str]:
    return [
        f"  batch {batched['batch']} / batch {one['batch']}",
        "",
        "",
        fmt_ratio(batched["tokens_per_s"], one["tokens_per_s"]),
        fmt_ratio(batched["ttft"]["p50_ms"], one["ttft"]["p50_ms"]),
        fmt_ratio(batched["latency"]["p50_ms"], one["latency"]["p50_ms"]),
        "",
    ]


# ---------------------------------------------------------------- aims


def ratio(numerator: float | None, denominator: float | None) -> float:
    if not denominator or numerator is None or numerator != numerator:
        return NAN
    return numerator / denominator


def aim(text: str, measured: str, value: float, limit: float, at_least: bool) -> dict:
    met = value == value and (value >= limit if at_least else value <= limit)
    return {"aim": text, "measured": measured, "value": round(value, 3), "limit": round(limit, 3), "met": met}


def aims(chats: dict, joiner: dict, embeddings: Sequence[dict], raw: dict) -> list[dict]:
    """The issue's aims from the case dicts: `chats` and `raw` keyed by (max_batch or
    batch, clients) and (kind, batch)."""
    one, batched = chats[1, 16], chats[16, 16]
    server = ratio(batched["tokens_per_s"], one["tokens_per_s"])
    ceiling = ratio(raw["start_batch", 16]["tokens_per_s"], raw["start_batch", 1]["tokens_per_s"])
    reference = ratio(raw["generate", 16]["tokens_per_s"], raw["generate", 1]["tokens_per_s"])
    raw_latency = raw["start_batch", 16]["latency"]["p50_ms"]
    single = chats[16, 1]["ttft"]["p50_ms"]
    late = joiner["joiner_ttft"]["p50_ms"]
    one_embed, many_embed = embeddings[0], embeddings[-1]
    embed_ratio = ratio(many_embed["inputs_per_s"], one_embed["inputs_per_s"])
    return [
        aim(
            "at 16 clients, tok/s of max_batch 16 over max_batch 1 >= 80% of the raw model's batch-16/batch-1 ratio",
            f"{fmt(batched['tokens_per_s'], 1)} / {fmt(one['tokens_per_s'], 1)} = {server:.2f}x against "
            f"start_batch's {ceiling:.2f}x ({100 * ratio(server, ceiling):.0f}%; plain generate's: {reference:.2f}x)",
            ratio(server, ceiling),
            0.8,
            at_least=True,
        ),
        aim(
            "per-request latency p50 at 16 clients (max_batch 16) <= 1.25x the raw batch-16 latency",
            f"{fmt(batched['p50_ms'] / 1000, 2)} s against start_batch's {fmt(raw_latency / 1000, 2)} s "
            f"= {ratio(batched['p50_ms'], raw_latency):.2f}x",
            ratio(batched["p50_ms"], raw_latency),
            1.25,
            at_least=False,
        ),
        aim(
            f"TTFT of a client joining {joiner['decoders']} decoding <= 2x the single-client TTFT",
            f"{fmt(late, 0)} ms against {fmt(single, 0)} ms = {ratio(late, single):.2f}x",
            ratio(late, single),
            2.0,
            at_least=False,
        ),
        aim(
            f"embeddings: {many_embed['clients']} clients >= 2x the inputs/s of 1 client",
            f"{fmt(many_embed['inputs_per_s'], 1)} / {fmt(one_embed['inputs_per_s'], 1)} = {embed_ratio:.2f}x",
            embed_ratio,
            2.0,
            at_least=True,
        ),
    ]


def print_aims(found: Sequence[dict]) -> None:
    print()
    for item in found:
        print(f"aim: {item['aim']}: measured {item['measured']} -> {'met' if item['met'] else 'NOT met'}")
