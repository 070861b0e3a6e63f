"""care.eval: medical multiple-choice benchmarks and generation metrics for HF, GGUF and ONNX models.

- benchmarks: loaders for MedMCQA, PubMedQA (PQA-L), MMLU medical, MedQA-USMLE; harness-style prompts
- backends:   HFBackend / GGUFBackend / ONNXBackend, open_backend("[LABEL=]PATH")
- scoring:    score_benchmark (option-letter log-likelihood), wilson_ci
- metrics:    ROUGE, BERTScore (local all-MiniLM-L6-v2), PubMedQA decision accuracy / F1
- generation: query -> reference sets and the generate-and-score loop
- report:     results.json, report.md, PNG charts, compare()
- runner:     run_mc / run_generate, what `care eval run|generate` call

Nothing heavy is imported here: torch, transformers and llama_cpp load inside the backends.
"""
