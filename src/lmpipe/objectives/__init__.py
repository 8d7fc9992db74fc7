"""Stage losses behind the Objective seam (``base.Objective``)."""

from lmpipe.objectives.base import Objective

__all__ = ["Objective"]
