"""Build tools: the one place that compiles llama.cpp (care.toolchain.llamacpp) and packs offline bundles
(care.toolchain.bundle). Standard library only, so `make setup` can run it before care is installed."""
