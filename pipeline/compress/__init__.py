"""Stage 1, compress: factorisation methods (a registry), rank rules, data-aware fitting, the decompose step,
the plan, budget allocation by measured sensitivity, and distillation fine-tuning."""
