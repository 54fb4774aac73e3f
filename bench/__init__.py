"""mrpc benchmark suite: ``python -m bench run``. See bench/README.md."""
