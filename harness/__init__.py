"""What the tests and ``bench.py`` share: the service and the fake run as processes, a throwaway PostgreSQL."""
