"""grpo_app: the application layer over the engine (grpo_core) and the policies (grpo_models).

The only layer that imports both. Its modules:

    cli          the `grpo` command: parser, subcommands, one-line errors (python -m grpo_app)
    commands     what `grpo train | sft | eval | resume-plan` do, as functions of a TrainConfig
    factory      policies by name (model.kind, model.path; model.tiny builds a tiny random one)
    warmup       the format warm-up before GRPO (SFT on random answers)
    demo         `grpo demo`: the CPU demo (its settings: demo.yaml)
    study        `grpo study`: the study's grid of settings × seeds, resumable
    study_table  the study's table and plot from its results
    judge        the tiny semantic judge the synthetic study trains and uses
    plotting     training curves and the demo's figure
    config_doc   docs/CONFIG.md generated from the config dataclasses

Arrows go one way: grpo_core <- grpo_models <- grpo_app.
"""
