"""Runtime: the llama.cpp chat engine, domains and safety, the local server and device benchmarks.

No torch or transformers here: this is what a chat-only laptop installs (care[runtime]).
"""
