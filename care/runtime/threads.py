"""Moved: CPU counting lives in care.system (usable_cpus, physical_cores, default_threads).

Kept only for care/pipeline/stages.py (helper A's file), which imports usable_cpus from here until it imports
care.system; delete this module then.
"""

from care.system import default_threads, physical_cores, usable_cpus

__all__ = ["default_threads", "physical_cores", "usable_cpus"]
