"""The web chat's time to first token against the API's own, on the same request to the same `care serve`.

    python bench/web_ttft.py [--rounds 6] [--model F.gguf] [--threads 1] [--max-tokens 16]

Starts `care serve` on 127.0.0.1 (the embedded SmolLM2 GGUF by default). Each round sends one question twice,
in alternating order, each copy with its own leading tag so neither reuses the other's cached prompt: (a) straight to /v1/chat/completions over httpx, streaming, timed to the first content
chunk; (b) typed into the web chat (care/runtime/web) in Debian's headless chromium, driven by Selenium, timed by
the page itself from its fetch() to the first reply text it draws (`window.careFirstTokenMs`). Both send the
page's body ({"messages": [...], "stream": true}), so the server does the same work. Reported: each round, the
medians and the ratio browser / API. Target (issue 24): the browser within 10% of the API (ratio <= 1.10).
Needs `make web-tools` (chromium, chromium-driver) and selenium (care[dev]). Writes JSON (--out).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

QUESTIONS = [
    "What foods help a child recover from diarrhoea?",
    "How do I keep my bank card safe when I travel?",
    "Why does my phone lose signal indoors?",
    "How much water should an adult drink in hot weather?",
    "What is a normal blood pressure for a woman of 50?",
    "Can I change the PIN of my card at an ATM?",
    "How long does a cold usually last?",
    "How do I check my mobile data balance?",
]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def api_ttft(url: str, question: str) -> float:
    import httpx

    body = {"messages": [{"role": "user", "content": question}], "stream": True}
    started = time.perf_counter()
    ttft = None
    with httpx.stream("POST", url + "/v1/chat/completions", json=body, timeout=300) as r:
        r.raise_for_status()
        # One pass over the stream (httpx streams once), read to the end: the next request must not queue
        # behind this reply.
        for line in r.iter_lines():
            if ttft is not None or not line.startswith("data: ") or line == "data: [DONE]":
                continue
            obj = json.loads(line[6:])
            if any(c.get("delta", {}).get("content") for c in obj.get("choices", [])) and not (
                    obj.get("care_safety") or obj.get("care_card")):
                ttft = time.perf_counter() - started
    if ttft is None:
        raise SystemExit(f"web_ttft: no content for {question!r}")
    return ttft


def browser():
    from selenium import webdriver
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service

    binary = shutil.which("chromium") or shutil.which("chromium-browser")
    driver = shutil.which("chromedriver")
    if not binary or not driver:
        raise SystemExit("web_ttft: Debian's chromium and chromium-driver are needed: run `make web-tools` as root")
    opts = Options()
    opts.binary_location = binary
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=360,740",
                "--disable-gpu", "--no-first-run"):
        opts.add_argument(arg)
    return webdriver.Chrome(service=Service(driver), options=opts)


def page_ttft(driver, url: str, question: str) -> float:
    driver.get(url + "/")
    driver.execute_script("localStorage.clear()")
    driver.get(url + "/")  # a new chat: the page sends this one message, as the API call does
    box = driver.find_element("id", "text")
    box.send_keys(question)
    driver.find_element("id", "send").click()
    deadline = time.time() + 300
    while time.time() < deadline:
        done = driver.execute_script("return !document.getElementById('send').disabled && window.careFirstTokenMs")
        if done:
            return float(done) / 1000
        time.sleep(0.05)
    raise SystemExit(f"web_ttft: the page drew no reply for {question!r}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--model", default=None, help="GGUF (default: the embedded SmolLM2)")
    parser.add_argument("--threads", type=int, default=int(os.environ.get("CARE_THREADS", "1")))
    parser.add_argument("--max-tokens", type=int, default=16, help="the server's reply length")
    parser.add_argument("--out", default=".cache/bench/web_ttft.json")
    opts = parser.parse_args()
    import httpx

    from care.models import embedded_gguf

    gguf = Path(opts.model) if opts.model else embedded_gguf()
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    proc = subprocess.Popen([sys.executable, "-m", "care", "serve", "--host", "127.0.0.1", "--port", str(port),
                             "--model", str(gguf), "--threads", str(opts.threads), "--temperature", "0",
                             "--max-tokens", str(opts.max_tokens)], stdout=subprocess.DEVNULL)
    driver = None
    rows = []
    try:
        deadline = time.time() + 180
        while True:
            if proc.poll() is not None or time.time() > deadline:
                raise SystemExit("web_ttft: care serve did not start")
            try:
                if httpx.get(url + "/v1/models", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.3)
        driver = browser()
        api_ttft(url, "Hello")  # warm-up: model pages in, prompt cache primed for the system prompt
        page_ttft(driver, url, "Hello")
        for i in range(opts.rounds):
            q = QUESTIONS[i % len(QUESTIONS)]
            # Each side's copy starts with its own tag of the same length: llama.cpp reuses a cached prompt
            # prefix, so with the same words the second sender of a round would only pay for the last token.
            qa, qb = f"(a) {q}", f"(b) {q}"
            if i % 2 == 0:
                a, b = api_ttft(url, qa), page_ttft(driver, url, qb)
            else:
                b, a = page_ttft(driver, url, qb), api_ttft(url, qa)
            rows.append({"question": q, "api_s": round(a, 4), "browser_s": round(b, 4)})
            print(f"round {i + 1}: API {a * 1000:7.1f} ms   browser {b * 1000:7.1f} ms   {q}")
    finally:
        if driver is not None:
            driver.quit()
        proc.terminate()
        proc.wait(timeout=30)
    api = statistics.median(r["api_s"] for r in rows)
    web = statistics.median(r["browser_s"] for r in rows)
    report = {"model": str(gguf), "threads": opts.threads, "rounds": rows, "api_median_s": api,
              "browser_median_s": web, "ratio": web / api, "target_ratio": 1.10, "cpus": os.cpu_count()}
    print(f"median TTFT: API {api * 1000:.1f} ms, browser {web * 1000:.1f} ms, ratio {web / api:.3f} "
          f"(target <= 1.10: {'met' if web / api <= 1.10 else 'NOT met'})")
    out = Path(opts.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
