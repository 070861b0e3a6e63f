"""The whole pipeline in one call: train -> merge -> export GGUF (verified) -> before/after chat -> eval.

`care demo` runs it on the built-in demo recipe (the embedded SmolLM2-135M-Instruct, a short multi-domain
QLoRA run on the sample exchanges shipped in care/data/samples); `care demo --recipe R.yaml [--smoke]` runs it
for any recipe, which is how the slow test checks every shipped recipe end to end.

- recipe.py: the built-in demo recipe, the sample files and the before/after questions;
- stages.py: one function per stage over a `RunContext` (train, merge, export, before_after, eval);
- run.py: `run_pipeline`, which runs them in order;
- report.py: demo_report.json/.md and the progress hooks (`Reporter`) the CLI renders.

Output folder layout:
    recipe.yaml            resolved config, written first
    train/                 care.train output (adapter/, metrics.jsonl, loss.png, data_report.json, ...)
    merged/                merged Hugging Face model (care.train.merge)
    gguf/                  exported GGUF(s), manifest.json, verify.json (care.export)
    base-gguf/             the base model as GGUF, when the base is not the embedded one
    eval/, eval-gen/       care.eval results (when the recipe asks for them)
    demo_report.json/.md   what ran, how long each stage took, before/after answers, the chat command

The report is rewritten after every stage, so Ctrl-C (or a failure) leaves an accurate partial report with
the stage marked `interrupted` / `failed`, and nothing already written is removed.
"""

from care.pipeline.recipe import (
           DEFAULT_STEPS,
           QUESTIONS,
           SAMPLE_DOMAINS,
           SAMPLES_DIR,
           demo_recipe,
           demo_recipe_dict,
           sample_file,
)
from care.pipeline.report import STAGES, PipelineReport, Reporter, StageRecord, render_markdown, save_report
from care.pipeline.run import run_pipeline
from care.pipeline.stages import PipelineOptions, RunContext, before_after, default_out_dir, run_eval

__all__ = ["DEFAULT_STEPS", "QUESTIONS", "SAMPLES_DIR", "SAMPLE_DOMAINS", "STAGES", "PipelineOptions", "PipelineReport",
           "Reporter", "RunContext", "StageRecord", "before_after", "default_out_dir", "demo_recipe",
           "demo_recipe_dict", "render_markdown", "run_eval", "run_pipeline", "sample_file", "save_report"]
