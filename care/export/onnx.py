"""`care export onnx`: merged HF folder -> ONNX (int4 default, int8, fp32) with onnxruntime-genai's model
builder, verified against the HF model (logits KL / top-1 / perplexity, tokenizer parity) and by generating a
reply through onnxruntime-genai.

Why the builder and not optimum: optimum's ONNX exporter (`optimum-onnx` 0.1.0) requires transformers < 4.58,
and installing it downgrades the transformers 5 this project uses (a transformers-5 folder read by 4.57
silently gets the wrong rope_theta). The builder reads transformers-5 folders and writes the
onnxruntime-genai layout (model.onnx + genai_config.json + tokenizer) that runs on phones via ORT Mobile.

int4 algorithm, chosen by measured quality. bench/export.py --onnx on SmolLM2-135M (KL vs the HF model over
241 held-out tokens): the builder's default RTN int4 KL 0.39 (top-1 0.67, 86 MiB); `k_quant_mixed` (k-quant
int4 body, int8 for the lm_head and the most sensitive layers, llama.cpp's Q4_K_M recipe) KL 0.20 (top-1
0.77, 112 MiB); int8 KL 0.004 (top-1 0.95). An earlier measurement on other text gave 1.22 / 0.14 / 0.003.
So int4 uses k_quant_mixed unless asked otherwise; int8 when quality matters more than size.
"""

from __future__ import annotations

import logging
import os
import shutil
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from care.artifacts import ONNX_MANIFEST, file_records, onnx_manifest, public_name, source_record
from care.errors import ExportError, ToolError, UsageError, VerificationError, WorkerError, require
from care.io import check_free_space, make_readable, write_json
from care.proc import run_tool, run_worker, worker_main

log = logging.getLogger(__name__)

PRECISIONS = ("int4", "int8", "fp32")
DEFAULT_INT4_ALGO = "k_quant_mixed"
INT4_ALGOS = ("k_quant_mixed", "k_quant_last", "k_quant", "rtn", "rtn_last", "default")
# KL(HF || ONNX) limits in nats/token for models < 1B / >= 1B parameters. int4 k_quant_mixed is the
# same recipe as Q4_K_M, so it gets Q4_K_M's limits (measured 0.14 on SmolLM2-135M); int8 ~ Q8_0;
# fp32 must be near-exact (only kernel summation order differs).
KL_LIMITS = {"int4": (0.4, 0.1), "int8": (0.02, 0.005), "fp32": (1e-4, 1e-4)}


@dataclass
class OnnxExportResult:
    out_dir: Path
    precision: str
    int4_algo: str | None
    manifest_path: Path
    verify_report: dict[str, Any] | None
    size_bytes: int
    seconds: dict[str, float] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def export_onnx(
    model_dir: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    precision: str = "int4",
    verify: bool = True,
    int4_algo: str | None = None,
    n_threads: int | None = None,
    verify_kwargs: dict[str, Any] | None = None,
) -> OnnxExportResult:
    """Build an onnxruntime-genai model folder at `out_dir` (built in a temp folder, renamed when done)."""
    from care.export.hf_source import inspect_model_dir

    require("onnxruntime_genai", "export")
    require("onnx_ir", "export")
    if precision not in PRECISIONS:
        raise UsageError(f"Unknown ONNX precision '{precision}'", hint=f"Choose from: {', '.join(PRECISIONS)}")
    algo = (int4_algo or DEFAULT_INT4_ALGO) if precision == "int4" else None
    if algo is not None and algo not in INT4_ALGOS:
        raise UsageError(f"Unknown int4 algorithm '{algo}'", hint=f"Choose from: {', '.join(INT4_ALGOS)}")
    src = inspect_model_dir(model_dir)
    out = Path(out_dir).expanduser()
    if out.exists() and any(out.iterdir()) and not (out / ONNX_MANIFEST).is_file():
        raise UsageError("The output folder exists and is not a previous `care export onnx` output", path=out,
                         hint="Choose an empty or new --out folder")
    out.parent.mkdir(parents=True, exist_ok=True)
    per_weight = {"int4": 0.3, "int8": 0.55, "fp32": 1.1}[precision]
    check_free_space(out.parent, int(src.weight_bytes * per_weight) + 2**20, "ONNX model")
    seconds: dict[str, float] = {}
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".part", dir=out.parent))
    try:
        build = tmp / "model"
        t0 = time.perf_counter()
        _run_builder(src.path, build, tmp / "cache", precision, algo, n_threads)
        seconds["build"] = time.perf_counter() - t0
        shutil.rmtree(tmp / "cache", ignore_errors=True)
        if not (build / "genai_config.json").is_file():
            raise ExportError("The ONNX builder finished without writing genai_config.json", path=src.path)
        report = None
        if verify:
            t0 = time.perf_counter()
            report = verify_onnx(build, src.path, precision=precision, n_threads=n_threads,
                                 **(verify_kwargs or {}))
            seconds["verify"] = time.perf_counter() - t0
            write_json(build / "verify.json", report)
        files = sorted(p for p in build.iterdir() if p.is_file() and p.name != ONNX_MANIFEST)
        manifest = onnx_manifest(
            source=source_record(src.path, src.architecture, src.provenance), files=file_records(files),
            precision=precision,
            int4_algo=algo,
            builder={"onnxruntime_genai": _version("onnxruntime-genai"), "onnxruntime": _version("onnxruntime")},
            verified=None if report is None else report["passed"],
            seconds={k: round(v, 2) for k, v in seconds.items()},
        )
        write_json(build / "export_config.json", {"model_dir": public_name(str(src.path.resolve())),
                                                  "out_dir": public_name(str(out.resolve())),
                                                  "precision": precision, "int4_algo": algo, "verify": verify,
                                                  "n_threads": n_threads})
        write_json(build / ONNX_MANIFEST, manifest)
        if out.exists():
            shutil.rmtree(out)
        os.replace(build, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    for p in out.iterdir():
        make_readable(p)
    result = OnnxExportResult(out_dir=out, precision=precision, int4_algo=algo, manifest_path=out / ONNX_MANIFEST,
                              verify_report=report, size_bytes=sum(p.stat().st_size for p in out.iterdir()),
                              seconds=seconds)
    if report is not None and not report["passed"]:
        exc = VerificationError("ONNX verification failed: " + "; ".join(report["failures"][:3]),
                                path=out / "verify.json", hint="See verify.json; try --int8 or another --int4-algo")
        exc.result = result  # type: ignore[attr-defined]
        raise exc
    return result


def _version(dist: str) -> str | None:
    from importlib import metadata

    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def _run_builder(src: Path, out: Path, cache: Path, precision: str, algo: str | None,
                 n_threads: int | None) -> None:
    cmd = [sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", str(src), "-o", str(out),
           "-p", precision, "-e", "cpu", "-c", str(cache)]
    extra = [f"algo_config={algo}"] if algo and algo != "default" else []
    if extra:
        cmd += ["--extra_options", *extra]
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    if n_threads:
        env["OMP_NUM_THREADS"] = str(n_threads)
    try:
        run_tool(cmd, what="onnxruntime-genai's model builder", env=env, path=src)
    except ToolError as exc:
        raise ExportError(f"onnxruntime-genai's model builder failed: {exc.detail or exc.message}", path=src,
                          hint="Run with CARE_DEBUG=1 for its full output") from exc


def verify_onnx(onnx_dir: str | os.PathLike[str], hf_model_dir: str | os.PathLike[str], precision: str = "int4",
                n_threads: int | None = None, max_tokens: int = 160, gen_tokens: int = 16,
                fail: bool = False) -> dict[str, Any]:
    """Compare an onnxruntime-genai model folder with its HF source: logits (same token ids), tokenizer,
    and a greedy reply generated through onnxruntime-genai."""
    import numpy as np

    from care.export.reference import EVAL_TEXTS, TOKENIZER_CORPUS, by_size, hf_reference, logit_metrics

    onnx_dir, hf_dir = Path(onnx_dir), Path(hf_model_dir)
    ref = hf_reference(hf_dir, max_tokens, EVAL_TEXTS)
    with tempfile.TemporaryDirectory(prefix="care-onnx-verify-") as tmp:
        job = {"onnx_dir": str(onnx_dir), "seqs": ref["seqs"], "corpus": list(TOKENIZER_CORPUS),
               "prompt": next((c["text"] for c in ref["chats"] if "text" in c), None), "gen_tokens": gen_tokens,
               "n_threads": n_threads or 0, "out": tmp}
        try:
            res = run_worker("care.export.onnx", job, workdir=Path(tmp), what="onnxruntime-genai")
        except WorkerError as exc:
            raise VerificationError(f"onnxruntime-genai could not run the model: {exc.detail or exc.message}",
                                    path=onnx_dir) from exc
        logits = [np.load(f) for f in res["logit_files"]]
        metrics = logit_metrics(ref["logprobs"], logits, ref["seqs"])
    limit = by_size(KL_LIMITS[precision], ref["n_params"])
    failures = []
    if metrics["kl_mean"] > limit:
        failures.append(f"mean KL {metrics['kl_mean']:.4g} exceeds the {precision} limit {limit:g}")
    if not res.get("reply_tokens"):
        failures.append("onnxruntime-genai generated no tokens")
    mism = sum(1 for t, ids in ref["corpus"].items() if res["corpus"].get(t) != ids)
    report = {"source": str(hf_dir.resolve()), "precision": precision, "kl_limit": limit, **metrics,
              "tokenizer": {"corpus_texts": len(ref["corpus"]), "mismatches": mism},
              "reply": res.get("reply"), "reply_tokens": res.get("reply_tokens"),
              "failures": failures, "passed": not failures}
    if fail and failures:
        raise VerificationError("ONNX verification failed: " + "; ".join(failures), path=onnx_dir)
    return report


def onnx_side(job: dict[str, Any]) -> dict[str, Any]:
    """The worker: logits (saved as .npy) and a greedy reply through onnxruntime-genai."""
    import numpy as np
    import onnxruntime_genai as og

    out = Path(job["out"])
    model = og.Model(og.Config(job["onnx_dir"]))
    tok = og.Tokenizer(model)
    res: dict[str, Any] = {"logit_files": [], "corpus": {}}
    for i, ids in enumerate(job["seqs"]):
        params = og.GeneratorParams(model)
        params.set_search_options(max_length=len(ids) + 1, do_sample=False)
        gen = og.Generator(model, params)
        gen.append_tokens(np.asarray(ids, dtype=np.int32))
        logits = np.asarray(gen.get_output("logits"))[0].astype(np.float32)
        path = out / f"logits{i}.npy"
        np.save(path, logits)
        res["logit_files"].append(str(path))
        del gen
    for text in job["corpus"]:
        res["corpus"][text] = [int(t) for t in tok.encode(text)]
    if job["prompt"]:
        ids = tok.encode(job["prompt"])
        params = og.GeneratorParams(model)
        params.set_search_options(max_length=len(ids) + job["gen_tokens"], do_sample=False)
        gen = og.Generator(model, params)
        gen.append_tokens(ids)
        new: list[int] = []
        while not gen.is_done():
            gen.generate_next_token()
            new.append(int(gen.get_next_tokens()[0]))
        res["reply"] = tok.decode(np.asarray(new, dtype=np.int32))
        res["reply_tokens"] = len(new)
    return res


if __name__ == "__main__":
    sys.exit(worker_main(onnx_side))
