"""The pipeline's stages, one module each (``pipeline/<stage>.py`` and the ``synermix`` CLI
call their ``run_<stage>``); :mod:`synermix.stages.common` holds what two stages share.

Each ``run_<stage>`` reads its inputs, calls the pure work function, writes exactly the
outputs dvc.yaml declares (paths: :mod:`synermix.paths`), then logs its MLflow run. This
file imports nothing, so a stage's code is its own module plus ``common.py``: dvc.yaml
lists those, and a change to one stage re-runs that stage and the ones after it only.
"""
