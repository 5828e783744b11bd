"""pyllmc's benchmarks. Each file runs as a script (`python dev/bench/run.py`) and imports its siblings from
its own folder; with dev/ on sys.path they also import as the package `bench`, as the tests (pytest puts
dev/ there) and dev/gpu_check_report.py (which renders run.py's report) import them."""
