"""The CARE runtime on aarch64, under emulation (slow suite): `care bundle --platform linux-aarch64` installed
with no network by its own install.sh inside an arm64 Debian 12 userland, every program of it (the shell,
coreutils, Python, llama.cpp) run by qemu-aarch64 through binfmt_misc (`make arm-root` sets that up, as root).

Checked: the install (checksums, CPU features, Python, the CPU guard), `care triage` and `care chat --once` on
an emergency (the notice, then the first-aid card, no model), the greedy reply to a plain question equal to
x86's with the same model, and the TUI in tmux (a screenshot in .cache/tests/artifacts/). Nothing here ran on a
real ARM phone or board. Figures (time, size) are printed.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pytest

from care.toolchain import llamacpp

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parent.parent
ARTIFACTS = REPO / ".cache" / "tests" / "artifacts"
ROOT = Path(os.environ.get("CARE_ARM_ROOT") or Path.home() / ".cache" / "care" / "arm64-root-bookworm")
# A Cortex-A76's /proc/cpuinfo (Raspberry Pi 5, 2019+ phones): under qemu-user the file shows the host's CPU.
A76 = ("Features\t: fp asimd evtstrm aes pmull sha1 sha2 crc32 atomics fphp asimdhp cpuid asimdrdm lrcpc dcpop "
       "asimddp\nCPU part\t: 0xd0b\n")
EMERGENCY = "my baby is 3 weeks old and has a fever and won't feed"
QUESTION = "What helps a child with a mild cold?"


def _why_not() -> str | None:
    if shutil.which("qemu-aarch64") is None:
        return "qemu-aarch64 is not installed: `make cross-tools` (as root)"
    if not (ROOT / "usr" / "bin" / "python3.11").is_file() or not (ROOT / "usr" / "bin" / "awk").exists():
        return f"no arm64 userland at {ROOT}: `make arm-root` (as root)"
    binfmt = Path("/proc/sys/fs/binfmt_misc/qemu-aarch64")
    if not binfmt.is_file() or "enabled" not in binfmt.read_text():
        return "aarch64 programs are not handed to qemu (binfmt_misc): `make arm-root` (as root)"
    if llamacpp.find_wheel(target="linux-aarch64") is None and shutil.which("aarch64-linux-gnu-g++") is None:
        return "no aarch64 llama-cpp-python wheel cached and no cross compiler: `make arm-wheel`"
    return None


@pytest.fixture(scope="module")
def arm(tmp_path_factory, embedded_gguf):
    reason = _why_not()
    if reason:
        pytest.skip(reason)
    from care.toolchain.bundle import build_bundle

    work = tmp_path_factory.mktemp("arm")
    t0 = time.monotonic()
    bundle = build_bundle(embedded_gguf, work / "care-arm", target="linux-aarch64")  # finds or builds the wheel
    built = time.monotonic() - t0
    phone = work / "phone"
    phone.mkdir()
    with tarfile.open(bundle.archive) as tar:
        tar.extractall(phone, filter="data")
    (work / "cpuinfo").write_text(A76)
    home = work / "home"
    home.mkdir()
    env = {"HOME": str(home), "PATH": f"{ROOT}/usr/bin:{ROOT}/bin", "QEMU_LD_PREFIX": str(ROOT), "LANG": "C.UTF-8",
           "CARE_CPUINFO": str(work / "cpuinfo"), "PYTHON": "python3.11"}
    prefix = home / "care-edge"
    t1 = time.monotonic()
    cmd = [str(ROOT / "bin" / "sh"), "./install.sh", str(prefix)]
    if os.geteuid() == 0 and shutil.which("unshare") and subprocess.run(["unshare", "-n", "true"]).returncode == 0:
        cmd = ["unshare", "-n", *cmd]  # no network at all while installing
    proc = subprocess.run(cmd, cwd=phone / "care-arm", env=env, capture_output=True, text=True, timeout=1800)
    assert proc.returncode == 0, proc.stdout[-1500:] + proc.stderr[-1500:]
    installed = time.monotonic() - t1
    print(f"\naarch64 bundle: {bundle.folder_bytes / 2**20:.1f} MiB folder, {bundle.archive_bytes / 2**20:.1f} MiB "
          f"tar.gz, built in {built:.0f} s; offline install under emulation {installed:.0f} s")
    return {"env": env, "prefix": prefix, "install": proc, "model": embedded_gguf}


def _run(arm, *args: str, timeout: float = 1800) -> subprocess.CompletedProcess[str]:
    app = arm["prefix"] / "app"
    return subprocess.run([str(app / "venv" / "bin" / "python"), *args], env={**arm["env"],
                          "CARE_HOME": str(arm["prefix"] / "home")}, capture_output=True, text=True, timeout=timeout)


def test_install_ran_the_cpu_guard_on_arm(arm):
    out = arm["install"].stdout
    assert "llama.cpp CPU module: built-in" in out and "Done. Start the assistant with:" in out
    venv_lib = next((arm["prefix"] / "app" / "venv" / "lib").glob("python*/site-packages/llama_cpp/lib"))
    elf = (venv_lib / "libllama.so").read_bytes()[:20]
    assert elf[:4] == b"\x7fELF" and elf[18] == 183  # EM_AARCH64
    assert not list((arm["prefix"] / "app" / "venv" / "lib").glob("python*/site-packages/torch"))


def test_triage_and_an_emergency_answer_on_arm(arm):
    t0 = time.monotonic()
    proc = _run(arm, str(arm["prefix"] / "app" / "venv" / "bin" / "care"), "triage", EMERGENCY)
    assert proc.returncode == 0, proc.stderr[-1500:]
    assert '"category": "young_infant"' in proc.stdout
    start = arm["prefix"] / "start.sh"
    proc = subprocess.run([str(ROOT / "bin" / "sh"), str(start), "--once", EMERGENCY], env=arm["env"],
                          capture_output=True, text=True, timeout=1800)
    seconds = time.monotonic() - t0
    assert proc.returncode == 0, proc.stderr[-1500:]
    lines = proc.stdout.splitlines()
    assert lines[0].startswith("[SAFETY young_infant]") and lines[2] == "While help comes:" and lines[3].startswith("1. ")
    print(f"triage + notice and card on aarch64 (emulated): {seconds:.0f} s")


# The same model's logits from the ARM kernels (NEON dotprod + fp16, under qemu) and the x86 ones (AVX-512) differ
# by rounding: measured 2026-12-04 on SmolLM2 Q4_1, up to 0.57 on logits of 20-30. That is enough to flip a near
# tie: at the first token of QUESTION x86 prefers "A" over "When" by 0.42 and ARM by 0.04 (without a BOS token), so a greedy reply
# with a system prompt may depart at its first token (the xfail of 2026-12-03). A wrong kernel is off by whole
# units. So the two builds are compared on the same tokens (x86's greedy ones, fed to ARM one by one).
LOGIT_TOL = 1.0
GREEDY = Path(__file__).with_name("portable_greedy.py")


def test_arm_logits_match_x86(arm):
    prompt = f"<|im_start|>user\n{QUESTION}<|im_end|>\n<|im_start|>assistant\n"
    model = str(next((arm["prefix"] / "app" / "models").glob("*.gguf")))
    x86 = subprocess.run([sys.executable, str(GREEDY), model, "16", prompt], capture_output=True, text=True,
                         timeout=600)
    assert x86.returncode == 0, x86.stderr[-1500:]
    ref = json.loads(x86.stdout)
    t0 = time.monotonic()
    proc = _run(arm, str(GREEDY), model, "16", prompt, ",".join(map(str, ref["tokens"])))
    assert proc.returncode == 0, proc.stderr[-1500:]
    got = json.loads(proc.stdout)
    assert got["prompt_tokens"] == ref["prompt_tokens"] and got["tokens"] == ref["tokens"]
    worst, decisive = 0.0, 0
    for step, ((ids, vals), (arm_ids, arm_vals)) in enumerate(zip(ref["top"], got["top"], strict=True)):
        arm_logit = dict(zip(arm_ids, arm_vals, strict=True))
        shared = [(i, v) for i, v in zip(ids, vals, strict=True) if i in arm_logit]
        assert len(shared) >= 7, (step, ids, arm_ids)  # the same candidates
        worst = max(worst, *(abs(arm_logit[i] - v) for i, v in shared))
        if ref["margins"][step] >= 2 * LOGIT_TOL:  # not a near tie: ARM must pick x86's token
            decisive += 1
            assert arm_ids[0] == ref["tokens"][step], (step, ref["pieces"][step], ref["margins"][step])
    assert worst <= LOGIT_TOL, worst
    assert decisive >= 4, ref["margins"]  # the check above had something to check
    print(f"aarch64 vs x86 logits ({time.monotonic() - t0:.0f} s emulated): max |diff| {worst:.3f} over "
          f"{len(ref['tokens'])} steps; same argmax at all {decisive} steps whose x86 margin >= {2 * LOGIT_TOL}; "
          f"x86 greedy {''.join(ref['pieces'])!r}")


def test_tui_under_emulation_in_tmux(arm):
    if shutil.which("tmux") is None:
        pytest.skip("tmux is not installed")
    session = f"care-arm-{os.getpid()}"
    app = arm["prefix"] / "app"
    env = " ".join(f"{k}={v!s}" for k, v in {**arm["env"], "CARE_HOME": arm["prefix"] / "home",
                                            "TERM": "xterm-256color"}.items())
    cmd = f"env -i {env} {app / 'venv' / 'bin' / 'python'} {app / 'venv' / 'bin' / 'care'} chat --model " \
          f"{next((app / 'models').glob('*.gguf'))}"
    subprocess.run(["tmux", "new-session", "-d", "-s", session, "-x", "100", "-y", "32", cmd], check=True)
    try:
        t0 = time.monotonic()
        screen = ""
        while time.monotonic() - t0 < 600 and "ctx" not in screen:
            time.sleep(2)
            screen = subprocess.run(["tmux", "capture-pane", "-p", "-t", session], capture_output=True, text=True).stdout
        assert "ctx" in screen, screen
        loaded = time.monotonic() - t0
        subprocess.run(["tmux", "send-keys", "-t", session, "-l", EMERGENCY], check=True)
        subprocess.run(["tmux", "send-keys", "-t", session, "Enter"], check=True)
        while time.monotonic() - t0 < 900 and "While help comes" not in screen:
            time.sleep(2)
            screen = subprocess.run(["tmux", "capture-pane", "-p", "-t", session], capture_output=True, text=True).stdout
        assert "Safety: young_infant" in screen and "While help comes" in screen, screen
        assert screen.index("Safety: young_infant") < screen.index("While help comes")
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        (ARTIFACTS / "tui-aarch64-emulated.txt").write_text(screen, encoding="utf-8")
        _to_png(screen, ARTIFACTS / "tui-aarch64-emulated.png")
        print(f"TUI on aarch64 (emulated): ready in {loaded:.0f} s, notice and card shown at {time.monotonic() - t0:.0f} s")
    finally:
        subprocess.run(["tmux", "kill-session", "-t", session], capture_output=True)


def _to_png(screen: str, out: Path) -> None:
    """The pane's text as a PNG (headless chromium renders it in a monospace font), where chromium is here."""
    import html

    chromium = shutil.which("chromium")
    if chromium is None:
        return
    page = out.with_suffix(".html")
    page.write_text("<html><body style='margin:0;background:#111;color:#ddd'><pre style='font:14px monospace;"
                    f"margin:8px'>{html.escape(screen)}</pre></body></html>", encoding="utf-8")
    subprocess.run([chromium, "--headless=new", "--no-sandbox", "--disable-gpu", f"--screenshot={out}",
                    "--window-size=900,620", page.as_uri()], capture_output=True, timeout=120)
