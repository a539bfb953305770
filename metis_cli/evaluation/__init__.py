"""`metis eval` without the model work: report maths (report.py), tables (tables.py), the plot (plot.py).

Nothing in this package imports torch; the stage that generates answers is `metis_cli.stages.eval`.
"""
