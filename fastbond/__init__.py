"""fastbond: Best-of-N distillation (BOND, J-BOND) made cheap at Gemma scale."""

__version__ = "0.1.0"
