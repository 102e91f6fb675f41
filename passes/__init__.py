"""The graph side: capture (`capture`), one fx rewrite pass per file, the `PassManager` and pass
lists (`manager`), legalization into a target's operator set (`legalization`, `rewrite`), the cost
and pruning analyses (`analysis`, `dependency`), and `pipeline.Pipeline`, which runs them for
compile, check and tune. Reads the base layer and target data; imports nothing above.
"""
