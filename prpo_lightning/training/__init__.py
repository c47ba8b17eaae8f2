"""Training: the pass plan, the step's outcome, and the policy update (losses, log-probs, optimiser, LoRA, reference
sync)."""
