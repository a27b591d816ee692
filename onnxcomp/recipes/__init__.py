"""Recipes shipped with onnxcomp (TOML files; see onnxcomp.recipe)."""
