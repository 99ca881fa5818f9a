"""The upstream drift lane: does portvlm still hold on the newest transformers (and torch CPU build) released?

    resolve (newest versions on the user's index) → an env for them, and one for the newest verified CI stack
    → probe (each shim's answer per model, the upstream symbols portvlm uses) in both → the CPU cells in the newest,
    unverified versions allowed → report (results/drift/*.json + .md) → publish's "newest upstream" row and badge

``nox -s drift`` (``portvlm drift``) runs it; ``--transformers X`` forces the version (a "fake release" for tests).
The pure parts (choosing versions from index listings, comparing probe answers, the report) take data and return
data; ``lane.run_drift`` is the shell that builds envs and starts processes.
"""
