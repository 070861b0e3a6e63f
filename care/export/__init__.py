"""care.export"""
