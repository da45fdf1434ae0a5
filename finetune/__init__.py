"""The fine-tuning pipeline that produces MM-Embed-style weights (trains the same model class)."""
