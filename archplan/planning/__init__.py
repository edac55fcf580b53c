"""`archplan plan`: budgets to compute-optimal sizes (optimal), sizes to recipe specs (design),
partial specs to complete ones (solve), and specs to cluster layouts (parallel)."""
