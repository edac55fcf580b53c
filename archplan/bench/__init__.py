"""`archplan bench`: timed forward passes through the real modules (imports torch)."""
