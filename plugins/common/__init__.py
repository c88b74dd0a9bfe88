"""Common building blocks shared by the built-in plugins (heads, losses)."""
