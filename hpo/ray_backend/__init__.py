"""Ray Tune as the cluster engine: ``hpo worker --backend ray``.

The same studies and objectives as plain workers, run as Ray Tune trials on a Ray cluster (or a
local Ray instance): the study's sampler behind Ray's ``OptunaSearch``, the study's pruner as a
Ray scheduler, Ray's fault tolerance for dead trial processes, and every trial recorded in the
study's Optuna storage, where ``hpo status``, the ``optuna`` CLI and optuna-dashboard read it.
See ``docs/ray.md``.
"""

from hpo.ray_backend._run import run_on_ray

__all__ = ["run_on_ray"]
