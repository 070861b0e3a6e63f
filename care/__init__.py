"""CARE Edge: QLoRA fine-tuning to offline chat on small devices.

Keep this module light: `care --help`, `care chat` and the TUI import it, and must not pull in torch.
"""

__version__ = "0.1.0"
