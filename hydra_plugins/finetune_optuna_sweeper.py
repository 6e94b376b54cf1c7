"""finetune's Optuna sweeper where Hydra looks for plugins.

Hydra instantiates a sweeper only from a class defined in the ``hydra_plugins`` namespace package
(``Plugins.is_in_toplevel_plugins_module``) and finds it by scanning that package, so the wheel
ships this module beside ``finetune/``; the sweeper itself is :mod:`finetune.search.optuna_sweeper`.
``hydra/sweeper=optuna`` (conf/hydra/sweeper/optuna.yaml) names the class below.
"""

from finetune.search import optuna_sweeper


class FinetuneOptunaSweeper(optuna_sweeper.OptunaSweeper):
    """:class:`finetune.search.optuna_sweeper.OptunaSweeper`, under the name Hydra's registry requires."""
