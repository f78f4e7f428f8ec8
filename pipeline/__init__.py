"""Entry points, config and Ray wiring of controlforge."""
