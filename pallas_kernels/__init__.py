"""Pallas kernels for activation-sparse decoding (see DESIGN.md, "Kernels")."""
