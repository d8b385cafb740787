"""The jobs: prepare, train, sample, evaluate, analyze and report, each one function of (config, paths).

The DVC stage scripts (``stages/*.py``, through :func:`debias.pipeline.run_stage`) and the CLI commands
call the same functions — a stage with the pipeline's paths, a command with the paths and flags its user
gives (the flags mapped onto the config first) — so ``debias sample`` samples exactly as ``sample@``
does, ``debias fid`` scores exactly as ``evaluate@`` does and ``debias analyze`` analyses as ``analyze``
does. Each job module imports only what its job runs: its closure is its stage's dvc.yaml deps.
"""
