"""Model quality evaluations (`perfxllm eval ...`)."""
