"""Many runs, above one run (:mod:`finetune.train`): sweeps' summary and resolvers (:mod:`.sweep`),
finetune's Optuna sweeper for Hydra (:mod:`.optuna_sweeper`), the ranking of backbones on frozen
features (:mod:`.rank`) and ``finetune auto``'s search within a budget (:mod:`.auto`).
"""
