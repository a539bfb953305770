"""`metis curate`: the paper's data-curation filters, each reporting what it kept and dropped.

Layout: `rows.py` (one row under curation and its decision record), `row_images.py` (a row's
images: identity for dedup, the form each output keeps them in), `validity.py` (schema and
format checks), `execution.py` (re-running recorded tool calls), `sampling.py` (pass rates from
k rollouts: tool necessity and the RL filter), `judge.py` (strategic-tool-use LLM judge),
`filters.py` (the filter contract, dedup, and which filters a recipe runs in which order),
`decisions.py` (the append-only per-row decisions file that makes a run resumable), `report.py`
(counts per filter, report.json, the rich table, the curated output files). The stage that wires
them is `metis_cli/stages/curate.py`.
"""
