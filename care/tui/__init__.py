"""care.tui"""
