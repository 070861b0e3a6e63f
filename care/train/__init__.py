"""care.train"""
