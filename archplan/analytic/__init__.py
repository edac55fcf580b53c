"""The analytic sizer: exact integer counts from a resolved plan, pure Python (no torch import).

Every figure is keyed by module path (docs/architecture.md) so it can be compared, component by
component, with the torch model built from the same plan.
"""

from archplan.analytic.model import ParamCount, count_params

__all__ = ["ParamCount", "count_params"]
