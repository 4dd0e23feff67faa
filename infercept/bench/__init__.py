"""What the benchmark, the simulator and the tests share: synthetic traces of tool-using
requests after the paper's Table 1 (``workload``), per-request records, run metrics and
the summary files (``metrics``), and plots of a summary (``plots``, needs the ``bench``
extra's matplotlib).

Pure Python, no vLLM: ``infercept sim`` runs on it from an installed wheel. The real
engine's benchmark (``python -m benchmarks.run``, in the repository) builds on it.
"""
