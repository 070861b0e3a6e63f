"""Many users at once: `care serve` alone vs `care serve --upstream` -> `llama-server -np 4`, on loopback.

    python bench/serve_load.py [--clients 1,2,4,8] [--requests 2] [--max-tokens 48] [--threads 1] [--model F.gguf]

(a) `care serve` on the embedded SmolLM2 GGUF: one generation at a time behind the engine's lock.
(b) `care serve --upstream` in front of `llama-server -np 4` on the same GGUF (parallel slots, continuous
    batching), built by care.toolchain.llamacpp (`care export setup --tools`).

For each N, N streaming clients each send `--requests` requests one after another (a fixed amount of work;
the whole run is bounded by --time-limit). Reported per server and N: aggregate completion tok/s (all
completion tokens / wall time of the round), p50/p95 time to first token, errors. Then one flagged message is
sent to both and their safety notices must be identical. Target: (b) >= 2x (a)'s tok/s at 4 clients with
zero errors. Everything listens on 127.0.0.1 only. Prints a table and writes JSON (--out).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx

PROMPTS = [
    "Give me three tips for sleeping better.",
    "How do I keep a small vegetable garden healthy?",
    "Explain what a budget is in two sentences.",
    "What should I pack for a day hike?",
    "How can I make my phone battery last longer?",
    "Suggest a simple healthy breakfast.",
    "Why is drinking water important?",
    "How do I start learning to cook?",
]
FLAGGED = "My father has crushing chest pain and is sweating"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_ready(url: str, proc: subprocess.Popen, timeout: float = 180) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"serve_load: {url} exited with {proc.returncode} before it was ready")
        try:
            if httpx.get(url, timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.3)
    raise SystemExit(f"serve_load: {url} was not ready within {timeout:.0f} s")


def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


async def one_request(client: httpx.AsyncClient, url: str, prompt: str, max_tokens: int) -> dict:
    body = {"messages": [{"role": "user", "content": prompt}], "max_tokens": max_tokens, "temperature": 0,
            "seed": 0, "stream": True}
    started = time.monotonic()
    ttft = None
    tokens = 0
    async with client.stream("POST", url + "/v1/chat/completions", json=body) as r:
        if r.status_code != 200:
            await r.aread()
            return {"error": f"HTTP {r.status_code}: {r.text[:120]}"}
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            obj = json.loads(line[6:])
            if "error" in obj:
                return {"error": obj["error"].get("message", "error event")}
            for choice in obj.get("choices", []):
                if choice["delta"].get("content") and ttft is None:
                    ttft = time.monotonic() - started
            if obj.get("usage"):
                tokens = obj["usage"]["completion_tokens"]
    return {"ttft_s": ttft, "tokens": tokens, "elapsed_s": time.monotonic() - started}


async def round_of(url: str, clients: int, requests: int, max_tokens: int, deadline: float) -> dict:
    results: list[dict] = []

    async def user(i: int, client: httpx.AsyncClient) -> None:
        for j in range(requests):
            try:
                results.append(await one_request(client, url, PROMPTS[(i * requests + j) % len(PROMPTS)], max_tokens))
            except (httpx.HTTPError, ValueError, KeyError) as exc:
                results.append({"error": f"{type(exc).__name__}: {exc}"})

    started = time.monotonic()
    async with httpx.AsyncClient(timeout=httpx.Timeout(connect=5, read=120, write=10, pool=600)) as client:
        try:
            await asyncio.wait_for(asyncio.gather(*(user(i, client) for i in range(clients))),
                                   timeout=max(1.0, deadline - time.monotonic()))
        except TimeoutError:
            results.append({"error": "time limit reached"})
    wall = time.monotonic() - started
    ok = [r for r in results if "error" not in r]
    ttfts = [r["ttft_s"] for r in ok if r["ttft_s"] is not None]
    tokens = sum(r["tokens"] for r in ok)
    return {"clients": clients, "requests": len(results), "errors": len(results) - len(ok),
            "error_examples": [r["error"] for r in results if "error" in r][:3],
            "completion_tokens": tokens, "wall_s": round(wall, 2), "tok_s": round(tokens / wall, 2) if wall else 0,
            "ttft_p50_s": percentile(ttfts, 0.5), "ttft_p95_s": percentile(ttfts, 0.95)}


def notices(url: str) -> list[dict]:
    body = {"messages": [{"role": "user", "content": FLAGGED}], "max_tokens": 8, "temperature": 0}
    r = httpx.post(url + "/v1/chat/completions", json=body, timeout=300)
    r.raise_for_status()
    out = r.json()
    return [{"safety": out["care_safety"], "prefix": out["choices"][0]["message"]["content"].split("\n\n")[0]}]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--clients", default="1,2,4,8")
    parser.add_argument("--requests", type=int, default=2, help="requests per client per round")
    parser.add_argument("--max-tokens", type=int, default=48)
    parser.add_argument("--threads", type=int, default=int(os.environ.get("CARE_THREADS", "1")),
                        help="CPU threads for each engine (default $CARE_THREADS or 1)")
    parser.add_argument("--slots", type=int, default=4, help="llama-server -np")
    parser.add_argument("--time-limit", type=float, default=1500, help="seconds for the whole run")
    parser.add_argument("--llama-server", default=None, help="path (default: the build module's cached build)")
    parser.add_argument("--model", default=None, help="GGUF to serve (default: the embedded SmolLM2; "
                        "bench/phone_profile.py --phi35 builds a Phi-3.5-mini-shaped one in the care cache)")
    parser.add_argument("--slot-ctx", type=int, default=2048, help="context per llama-server slot")
    parser.add_argument("--out", default=".cache/bench/serve_load.json")
    opts = parser.parse_args()
    from care.models import embedded_gguf
    from care.toolchain.llamacpp import find_tools

    deadline = time.monotonic() + opts.time_limit
    gguf = Path(opts.model) if opts.model else embedded_gguf()
    binary = opts.llama_server or ((find_tools(["llama-server"]) or {}).get("llama-server"))
    if not binary:
        sys.stderr.write("serve_load: llama-server is not built; run `care export setup --tools` first\n")
        return 2
    counts = [int(c) for c in opts.clients.split(",")]
    common = ["--max-tokens", str(opts.max_tokens), "--temperature", "0", "--threads", str(opts.threads)]
    care = [sys.executable, "-m", "care", "serve", "--host", "127.0.0.1"]
    procs: list[subprocess.Popen] = []
    report: dict = {"model": str(gguf), "threads": opts.threads, "slots": opts.slots, "cpus": os.cpu_count(),
                    "load_avg_start": os.getloadavg(), "requests_per_client": opts.requests,
                    "max_tokens": opts.max_tokens, "servers": {}}
    try:
        pa, pl, pb = free_port(), free_port(), free_port()
        procs.append(subprocess.Popen([*care, "--model", str(gguf), "--port", str(pa), *common],
                                      stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        # -c: every slot gets n_ctx / slots; 2048 each, like care serve's context for this model.
        procs.append(subprocess.Popen([str(binary), "-m", str(gguf), "--host", "127.0.0.1", "--port", str(pl),
                                       "-np", str(opts.slots), "-c", str(opts.slot_ctx * opts.slots), "-t", str(opts.threads)],
                                      stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        wait_ready(f"http://127.0.0.1:{pl}/health", procs[1])
        procs.append(subprocess.Popen([*care, "--upstream", f"http://127.0.0.1:{pl}/v1", "--port", str(pb), *common],
                                      stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        servers = {"a_care_serve": f"http://127.0.0.1:{pa}", "b_upstream_llama_server": f"http://127.0.0.1:{pb}"}
        wait_ready(servers["a_care_serve"] + "/health", procs[0])
        wait_ready(servers["b_upstream_llama_server"] + "/health", procs[2])
        for name, url in servers.items():
            asyncio.run(round_of(url, 1, 1, 8, deadline))  # warm-up (page cache, first allocation)
            report["servers"][name] = {"rounds": []}
        # (a) and (b) alternate at each N, so a change in the machine's load hits both alike.
        for n in counts:
            for name, url in servers.items():
                report["servers"][name]["rounds"].append(
                    asyncio.run(round_of(url, n, opts.requests, opts.max_tokens, deadline)))
        for name, url in servers.items():
            report["servers"][name]["notices"] = notices(url)
    finally:
        for proc in procs:
            proc.terminate()
        for proc in procs:
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
    report["load_avg_end"] = os.getloadavg()
    a, b = report["servers"]["a_care_serve"], report["servers"]["b_upstream_llama_server"]
    report["notices_identical"] = a["notices"] == b["notices"]
    by_n = {name: {r["clients"]: r for r in s["rounds"]} for name, s in report["servers"].items()}
    print(f"{'server':26} {'N':>2} {'req':>4} {'err':>4} {'tokens':>6} {'wall s':>7} {'tok/s':>7} "
          f"{'TTFT p50':>9} {'TTFT p95':>9}")
    def fmt(v: float | None) -> str:
        return f"{v:9.2f}" if v is not None else f"{'-':>9}"

    for name, rounds in by_n.items():
        for n, r in rounds.items():
            print(f"{name:26} {n:>2} {r['requests']:>4} {r['errors']:>4} {r['completion_tokens']:>6} "
                  f"{r['wall_s']:>7.1f} {r['tok_s']:>7.1f} {fmt(r['ttft_p50_s'])} {fmt(r['ttft_p95_s'])}")
    if 4 in by_n["a_care_serve"]:
        ra, rb = by_n["a_care_serve"][4], by_n["b_upstream_llama_server"][4]
        ratio = rb["tok_s"] / ra["tok_s"] if ra["tok_s"] else float("inf")
        report["ratio_at_4"] = round(ratio, 2)
        report["target_met"] = ratio >= 2.0 and ra["errors"] == 0 and rb["errors"] == 0
        print(f"(b)/(a) aggregate tok/s at 4 clients: {ratio:.2f}x (target >= 2x, zero errors): "
              f"{'MET' if report['target_met'] else 'NOT MET'}")
    print(f"safety notices identical between (a) and (b): {report['notices_identical']} "
          f"({a['notices'][0]['prefix'][:60]!r})")
    print(f"machine: {report['cpus']} CPUs, load average {report['load_avg_start'][0]:.1f} -> "
          f"{report['load_avg_end'][0]:.1f}, {opts.threads} thread(s) per engine")
    Path(opts.out).parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(opts.out).with_suffix(".tmp")
    tmp.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    tmp.replace(opts.out)
    return 0 if report["notices_identical"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
