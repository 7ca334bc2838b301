"""The model: the frozen core, its projections, its variants, and plug-ins of ones own."""
