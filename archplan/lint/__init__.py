"""`archplan lint`: rule-coded checks of spec files for CI (see docs/rules.md).

Nothing here imports torch; the analytic sizer is imported only by the rules that need it.
"""

from archplan.lint.engine import Finding, LintConfig, LintResult, lint_file, lint_paths, lint_text
from archplan.lint.rules import BY_CODE, RULES, Rule

__all__ = [
    "BY_CODE", "RULES", "Finding", "LintConfig", "LintResult", "Rule", "lint_file", "lint_paths",
    "lint_text",
]
