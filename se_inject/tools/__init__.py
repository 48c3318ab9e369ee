"""Tools over the library: scan (every model, on the meta device), compare (variants side by side), bench (timing
helpers) and finetune (parameter groups for training the new modules)."""
