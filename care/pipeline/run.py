"""`run_pipeline`: the stages in order over one RunContext, the report saved after every stage."""

from __future__ import annotations

import time
from pathlib import Path

from care.errors import ConfigError
from care.io import write_text
from care.pipeline.report import STAGES, PipelineReport, Reporter, StageRecord, save_report
from care.pipeline.stages import STAGE_FUNCTIONS, PipelineOptions, RunContext, machine_summary
from care.train.config import Recipe


def run_pipeline(recipe: Recipe, out_dir: str | Path, *, smoke: bool = False,
                 options: PipelineOptions | None = None, reporter: Reporter | None = None) -> PipelineReport:
    """Train, merge, export (verified), answer the same questions before/after, evaluate; report everything.

    Raises KeyboardInterrupt (after saving the report) when interrupted, and the stage's CareError when a
    stage fails; in both cases the folder keeps what was written and demo_report.json says where it stopped."""
    opts = options or PipelineOptions()
    reporter = reporter or Reporter()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    previous = out / "recipe.yaml"
    if previous.is_file() and previous.read_text(encoding="utf-8") != recipe.to_yaml():
        # Re-running into the same folder continues that run; a different recipe would reuse a stale adapter.
        raise ConfigError("The output folder holds a run of a different recipe", path=out,
                          hint="Choose another --out folder (same command and settings to continue a run)")
    write_text(out / "recipe.yaml", recipe.to_yaml())
    rep = PipelineReport(recipe_name=recipe.name, out_dir=out.resolve(),
                         recipe_path=str(recipe.path) if recipe.path else None, smoke=smoke,
                         stages=[StageRecord(n) for n in STAGES], machine=machine_summary(opts.threads))
    ctx = RunContext(recipe=recipe, out=out, options=opts, reporter=reporter, report=rep)
    t_all = time.perf_counter()
    for i, name in enumerate(STAGES, 1):
        stage, description = STAGE_FUNCTIONS[name]
        rec = rep.stage(name)
        rec.status = "running"
        save_report(rep)
        t0 = time.perf_counter()
        try:
            reporter.stage_start(i, len(STAGES), name, description)
            stage(ctx, rec)
            if rec.status == "running":
                rec.status = "done"
        except KeyboardInterrupt:
            rec.status, rep.status = "interrupted", "interrupted"
            raise
        except BaseException as exc:
            rec.status, rep.status = "failed", "failed"
            rep.error = exc.one_line() if hasattr(exc, "one_line") else f"{type(exc).__name__}: {exc}"
            raise
        finally:
            rec.seconds = round(time.perf_counter() - t0, 2)
            rep.total_seconds = round(time.perf_counter() - t_all, 2)
            if rec.status != "running":
                reporter.stage_end(rec)
            save_report(rep)
    rep.status = "done"
    rep.total_seconds = round(time.perf_counter() - t_all, 2)
    save_report(rep)
    return rep
