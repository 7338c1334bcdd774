"""Entry points: the `t5g2` command line (cli.py), the demo (demo.py), the benchmark (bench.py),
and example job files (examples/). Nothing here is imported by pipeline/, operators/ or model/."""
