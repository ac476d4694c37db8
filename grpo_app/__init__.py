"""grpo_app: the application layer over the engine (grpo_core) and the policies (grpo_models).

The only layer that imports both: the `grpo` command (cli), policy loading by name (factory), the
CPU demo (demo) and the training-curve plots (plotting). Arrows go one way:
grpo_core <- grpo_models <- grpo_app.
"""
