"""`bistil run`: the BiStil recipe as one command over stage sub-workdirs.

`stages.py` declares the stages (what each reads, what settings determine
it, how it runs: through the other commands), `state.py` the fingerprints
that let a rerun skip, resume or redo each stage, `report.py` the report,
and `commands.py` the command line (docs/recipe.md).
"""
