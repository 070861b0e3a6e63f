"""care.eval"""
